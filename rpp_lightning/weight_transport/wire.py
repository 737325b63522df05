"""The one wire encoding of weights, shared by the client (sender) and the server (receiver).

A weight update is a client stream: one `WeightsHeader` (target version), messages of
`TensorChunks` (raw little-endian C-contiguous bytes with dtype and shape; small tensors share a
message, a tensor larger than the room left in one spans consecutive chunks with increasing
offsets), then one `WeightsCommit` repeating how many tensors and bytes were sent, so a
truncated stream is detected rather than half-applied. Never pickle: bytes become tensors with
`torch.frombuffer`.

    requests = iter_update_requests(model.state_dict().items(), target_version=3)
    update = WeightsAssembler(expected_shapes, current_version=2).assemble(requests)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rpp_lightning.proto import generation_pb2 as pb
from rpp_lightning.rpc.serving import invalid_argument, quote
from rpp_lightning.weight_transport.kinds import dtype_from_wire, dtype_to_wire

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
"""Tensor bytes per stream message: far below gRPC's message limit, large enough that the
per-message cost (about 0.1 ms through both gRPC stacks on loopback) is small next to moving
the bytes."""

# The wire is little-endian; viewing tensor memory as bytes is only that on little-endian hosts.
assert sys.byteorder == "little", "the weights wire format needs a little-endian host"

ExpectedShapes = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU contiguous tensor, without a copy (bf16 included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def iter_update_requests(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    target_version: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[pb.UpdateWeightsRequest]:
    """Header, chunk messages of at most `chunk_bytes` data each, commit (CPU tensors; others
    are copied to CPU).

    Tensors are read lazily, one message at a time, so streaming to several replicas from the
    same CPU tensors costs one message of extra memory per replica.
    """
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    yield pb.UpdateWeightsRequest(header=pb.WeightsHeader(target_version=target_version))
    num_tensors = num_bytes = 0
    request, room = pb.UpdateWeightsRequest(), chunk_bytes
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        wire = dtype_to_wire(tensor.dtype)
        data = tensor_bytes(tensor)
        shape = list(tensor.shape)
        offset = 0
        while True:  # at least one chunk, so empty tensors are announced too
            piece = data[offset : offset + room]
            request.chunks.chunks.add(
                name=name, dtype=wire, shape=shape, offset=offset, data=piece.tobytes()
            )
            offset += len(piece)
            room -= len(piece)
            if room <= 0:
                yield request
                request, room = pb.UpdateWeightsRequest(), chunk_bytes
            if offset >= len(data):
                break
        num_tensors += 1
        num_bytes += len(data)
    if request.chunks.chunks:
        yield request
    yield pb.UpdateWeightsRequest(
        commit=pb.WeightsCommit(num_tensors=num_tensors, num_bytes=num_bytes)
    )


def directory_update_requests(path: str, target_version: int) -> list[pb.UpdateWeightsRequest]:
    """The stream asking a server to load `*.safetensors` from its own file system."""
    return [
        pb.UpdateWeightsRequest(
            header=pb.WeightsHeader(target_version=target_version, safetensors_dir=path)
        ),
        pb.UpdateWeightsRequest(commit=pb.WeightsCommit()),
    ]


@dataclass
class WeightsUpdate:
    """A fully received and validated update, not yet applied."""

    target_version: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    num_bytes: int = 0
    safetensors_dir: str = ""
    """Set when the header asked for a directory load instead of chunks."""


def check_tensor(name: str, dtype: torch.dtype, shape: tuple[int, ...], expected: ExpectedShapes):
    """INVALID_ARGUMENT unless `name` is a model tensor with this dtype and shape."""
    if name not in expected:
        raise invalid_argument(f"unknown tensor name {quote(name)}: not in the model's state dict")
    want_dtype, want_shape = expected[name]
    if dtype != want_dtype:
        raise invalid_argument(
            f"tensor {quote(name)}: dtype {dtype} does not match the model's {want_dtype} "
            "(cast before sending)"
        )
    if tuple(shape) != tuple(want_shape):
        raise invalid_argument(
            f"tensor {quote(name)}: shape {list(shape)} does not match the model's "
            f"{list(want_shape)}"
        )


class WeightsAssembler:
    """Receives one UpdateWeights stream, validating as it goes; nothing is applied here."""

    def __init__(self, expected: ExpectedShapes, current_version: int) -> None:
        self.expected = expected
        self.current_version = current_version

    def assemble(self, requests: Iterable[pb.UpdateWeightsRequest]) -> WeightsUpdate:
        """Read the whole stream; INVALID_ARGUMENT (StatusError) at the first problem."""
        stream = iter(requests)
        first = next(stream, None)
        if first is None or first.WhichOneof("item") != "header":
            raise invalid_argument("an UpdateWeights stream must start with a WeightsHeader")
        header = first.header
        if header.target_version <= self.current_version:
            raise invalid_argument(
                f"target_version {header.target_version} must be greater than the current "
                f"version {self.current_version}"
            )
        update = WeightsUpdate(header.target_version, safetensors_dir=header.safetensors_dir)
        buffers: dict[str, bytearray] = {}
        filled: dict[str, int] = {}
        current: str | None = None
        for request in stream:
            kind = request.WhichOneof("item")
            if kind == "commit":
                self._finish(current, buffers, filled)
                self._check_commit(request.commit, update, buffers)
                if next(stream, None) is not None:
                    raise invalid_argument("messages after the WeightsCommit")
                for name, buffer in buffers.items():
                    dtype, shape = self.expected[name]
                    update.tensors[name] = _from_bytes(buffer, dtype, shape)
                return update
            if kind != "chunks":
                raise invalid_argument(f"unexpected {kind or 'empty message'} inside the stream")
            if update.safetensors_dir:
                raise invalid_argument("a stream with safetensors_dir must not carry chunks")
            for chunk in request.chunks.chunks:
                current = self._add_chunk(chunk, current, buffers, filled)
        raise invalid_argument("the UpdateWeights stream ended without a WeightsCommit")

    def _add_chunk(self, chunk, current, buffers, filled) -> str:
        name = chunk.name
        if name != current:
            self._finish(current, buffers, filled)
            if name in buffers:
                raise invalid_argument(
                    f"tensor {quote(name)} sent twice (chunks must be consecutive)"
                )
            dtype = dtype_from_wire(chunk.dtype)
            if dtype is None:
                raise invalid_argument(f"tensor {quote(name)}: unknown dtype enum {chunk.dtype}")
            check_tensor(name, dtype, tuple(chunk.shape), self.expected)
            buffers[name] = bytearray(_nbytes(*self.expected[name]))
            filled[name] = 0
        else:
            dtype, shape = self.expected[name]
            if dtype_from_wire(chunk.dtype) != dtype or tuple(chunk.shape) != tuple(shape):
                raise invalid_argument(
                    f"tensor {quote(name)}: dtype or shape changed between chunks"
                )
        buffer, data = buffers[name], chunk.data
        if chunk.offset != filled[name]:
            raise invalid_argument(
                f"tensor {quote(name)}: chunk offset {chunk.offset}, expected {filled[name]}"
            )
        if chunk.offset + len(data) > len(buffer):
            raise invalid_argument(
                f"tensor {quote(name)}: chunks exceed the tensor's {len(buffer)} bytes"
            )
        buffer[chunk.offset : chunk.offset + len(data)] = data
        filled[name] += len(data)
        return name

    @staticmethod
    def _finish(name: str | None, buffers: dict[str, bytearray], filled: dict[str, int]) -> None:
        if name is not None and filled[name] != len(buffers[name]):
            raise invalid_argument(
                f"tensor {quote(name)}: received {filled[name]} of {len(buffers[name])} bytes"
            )

    @staticmethod
    def _check_commit(commit, update: WeightsUpdate, buffers: dict[str, bytearray]) -> None:
        update.num_bytes = sum(len(b) for b in buffers.values())
        if update.safetensors_dir:
            return  # the counts describe chunks; a directory update has none
        if commit.num_tensors != len(buffers) or commit.num_bytes != update.num_bytes:
            raise invalid_argument(
                f"commit says {commit.num_tensors} tensors / {commit.num_bytes} bytes, "
                f"received {len(buffers)} / {update.num_bytes}"
            )
        if not buffers:
            raise invalid_argument("the update carries no tensors")


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * torch.empty((), dtype=dtype).element_size()


def _from_bytes(buffer: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    # frombuffer shares the bytearray's memory: no second copy of the update.
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
"""Linux's limits on a path and on one name in it (PATH_MAX, NAME_MAX)."""


def resolve_under_root(path: str, root: str | None) -> Path:
    """`path` with symlinks and `..` resolved, if it lies under `root`; else INVALID_ARGUMENT.

    Every way a client's path can fail (a NUL byte, a name or path too long, a symlink loop, a
    directory it may not read) is INVALID_ARGUMENT naming the path, never an exception."""
    if not root:
        raise invalid_argument(
            "this server takes no safetensors_dir updates (started without --weights-root)"
        )
    label = f"safetensors_dir {quote(path)}"
    if "\0" in path:
        raise invalid_argument(f"{label} contains a NUL character")
    if len(path.encode()) > MAX_PATH_BYTES or any(
        len(name.encode()) > MAX_NAME_BYTES for name in path.split("/")
    ):
        raise invalid_argument(
            f"{label} is too long (at most {MAX_PATH_BYTES} bytes, {MAX_NAME_BYTES} per name)"
        )
    try:
        resolved, allowed = Path(path).resolve(), Path(root).resolve()
        if not resolved.is_relative_to(allowed):
            raise invalid_argument(f"{label} is outside the allowed root {quote(root)}")
        if not resolved.is_dir():
            raise invalid_argument(f"{label} is not a directory")
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop (<3.13)
        raise invalid_argument(f"{label} cannot be resolved: {type(exc).__name__}") from exc
    return resolved


def load_safetensors_dir(directory: Path, expected: ExpectedShapes) -> dict[str, torch.Tensor]:
    """Every tensor of `directory/*.safetensors` (CPU), validated against `expected`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        files = sorted(directory.glob("*.safetensors"))
    except OSError as exc:
        raise invalid_argument(f"cannot list {quote(str(directory))}: {exc.strerror}") from exc
    if not files:
        raise invalid_argument(f"no *.safetensors files in {quote(str(directory))}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            loaded = load_file(file, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise invalid_argument(f"could not read {quote(file.name)}: {exc}") from exc
        for name, tensor in loaded.items():
            if name in tensors:
                raise invalid_argument(f"tensor {quote(name)} appears in more than one file")
            check_tensor(name, tensor.dtype, tuple(tensor.shape), expected)
            tensors[name] = tensor
    return tensors
