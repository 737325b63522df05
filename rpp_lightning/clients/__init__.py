"""The trainer's side of the wire: generation and reward clients, local server processes."""
