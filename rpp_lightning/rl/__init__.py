"""The iteration's parts, each a plain object tested alone; nothing here imports Lightning."""
