"""How weights move from the trainer to the generation servers: both sides of each transport."""
