"""Names on the wire shared by every transport: the transports, the tensor dtypes, and which
host a process runs on (sender and server use them alike)."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import torch

from rpp_lightning.proto import generation_pb2 as pb

SHM, CUDA_IPC, COLLECTIVE = (
    pb.WEIGHT_TRANSPORT_SHARED_MEMORY,
    pb.WEIGHT_TRANSPORT_CUDA_IPC,
    pb.WEIGHT_TRANSPORT_COLLECTIVE,
)
TRANSPORT_OF_NAME = {"shm": SHM, "cuda_ipc": CUDA_IPC, "collective": COLLECTIVE}
NAMES = ("auto", "grpc", "shm", "cuda_ipc", "collective")
"""GenerationEndpoint.weight_transport's values."""


@functools.cache
def host_id() -> str:
    """This host's identity: the kernel's boot id (differs between hosts, and between boots) and
    the host name. Two processes with the same one can share /dev/shm and CUDA IPC handles.
    `RPP_HOST_ID` overrides it (containers that share a kernel but not /dev/shm)."""
    if os.environ.get("RPP_HOST_ID"):
        return os.environ["RPP_HOST_ID"]
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{boot}/{socket.gethostname()}"


_TO_WIRE = {
    torch.float32: pb.TENSOR_DTYPE_FLOAT32,
    torch.float16: pb.TENSOR_DTYPE_FLOAT16,
    torch.bfloat16: pb.TENSOR_DTYPE_BFLOAT16,
    torch.float64: pb.TENSOR_DTYPE_FLOAT64,
    torch.int64: pb.TENSOR_DTYPE_INT64,
    torch.int32: pb.TENSOR_DTYPE_INT32,
    torch.uint8: pb.TENSOR_DTYPE_UINT8,
    torch.bool: pb.TENSOR_DTYPE_BOOL,
}
_FROM_WIRE = {wire: dtype for dtype, wire in _TO_WIRE.items()}


def dtype_to_wire(dtype: torch.dtype) -> int:
    """The TensorDtype enum value of a torch dtype (ValueError for unsupported dtypes)."""
    if dtype not in _TO_WIRE:
        raise ValueError(f"dtype {dtype} cannot be sent; supported: {sorted(map(str, _TO_WIRE))}")
    return _TO_WIRE[dtype]


def dtype_from_wire(wire: int) -> torch.dtype | None:
    """The torch dtype of a TensorDtype enum value, or None when unknown or unspecified."""
    return _FROM_WIRE.get(wire)
