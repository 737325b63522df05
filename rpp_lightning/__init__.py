"""rpp-lightning: REINFORCE++ for language models on PyTorch Lightning + FSDP2.

Importing this package is cheap on purpose (no torch): reward servers and the generated gRPC
stubs live under it and must deploy without the training stack.
"""

__version__ = "0.1.0"

from rpp_lightning import _moved

_moved.install()  # the module names of 0.1 (YAML class paths, pickled checkpoints) still import
