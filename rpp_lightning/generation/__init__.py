"""The generation server and its backends (transformers, vLLM); the client is in clients/."""
