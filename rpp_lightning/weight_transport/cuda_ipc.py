"""CUDA IPC transport: the server opens the sender's device tensors by handle and copies them.

Same host, both sides on CUDA. torch shares a CUDA storage between processes with
`UntypedStorage._share_cuda_()` (an IPC memory handle, a reference counter in shared memory that
keeps the allocation alive while the receiver holds it, and an event the receiver waits on so it
reads after the sender's writes) and rebuilds it with
`torch.multiprocessing.reductions.rebuild_cuda_tensor`. `torch.multiprocessing` sends that
tuple with pickle; here every field is explicit in a `CudaIpcTensor` message, so nothing is
unpickled from the wire.

The server copies each opened tensor device-to-device into a buffer of its own before the
commit is acknowledged, so the sender may free or overwrite its tensors once the
UpdateWeights call has returned.
"""

from __future__ import annotations

import torch

from rpp_lightning.proto import generation_pb2 as pb
from rpp_lightning.weight_transport.kinds import dtype_from_wire, dtype_to_wire


def available() -> bool:
    """Whether this process can share or open CUDA tensors."""
    return torch.cuda.is_available()


def share(name: str, tensor: torch.Tensor) -> pb.CudaIpcTensor:
    """The handle of a CUDA tensor; the tensor must stay alive until the server has copied it."""
    if tensor.device.type != "cuda":
        raise ValueError(f"tensor {name} is on {tensor.device}; CUDA IPC shares CUDA tensors")
    storage = tensor.untyped_storage()
    (
        device,
        handle,
        storage_size_bytes,
        storage_offset_bytes,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = storage._share_cuda_()
    return pb.CudaIpcTensor(
        name=name,
        dtype=dtype_to_wire(tensor.dtype),
        shape=list(tensor.shape),
        stride=list(tensor.stride()),
        storage_offset=tensor.storage_offset(),
        device=int(device),
        storage_handle=handle,
        storage_size_bytes=storage_size_bytes,
        storage_offset_bytes=storage_offset_bytes,
        ref_counter_handle=ref_counter_handle,
        ref_counter_offset=ref_counter_offset,
        event_handle=event_handle,
        event_sync_required=event_sync_required,
    )


def open_copy(message: pb.CudaIpcTensor, device: torch.device) -> torch.Tensor:
    """A copy on `device` of the tensor a handle names (the shared one is released after)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dtype = dtype_from_wire(message.dtype)
    if dtype is None:
        raise ValueError(f"tensor {message.name}: unknown dtype enum {message.dtype}")
    shared = rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(message.shape),
        tuple(message.stride),
        message.storage_offset,
        torch.storage.TypedStorage,
        dtype,
        message.device,
        message.storage_handle,
        message.storage_size_bytes,
        message.storage_offset_bytes,
        False,
        message.ref_counter_handle,
        message.ref_counter_offset,
        message.event_handle,
        message.event_sync_required,
    )
    copy = torch.empty(tuple(message.shape), dtype=dtype, device=device)
    copy.copy_(shared)
    torch.cuda.synchronize(device)
    return copy
