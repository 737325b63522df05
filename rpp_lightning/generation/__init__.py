"""Generation servers (transformers and vLLM backends) and the client the trainer uses."""
