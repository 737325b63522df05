"""Shared-memory transport: the sender writes tensors straight into a file the server maps.

Same host only. The server owns two files in /dev/shm, each laid out like its model (every
tensor of its state dict at a 64-byte aligned offset), and leases one per update: the sender
maps it (once; the mapping is kept across pushes) and copies every tensor into its slot, then
commits over gRPC. The transformers backend on CPU then *adopts* the region: its parameters
become views of the file, so an update costs the sender's one copy plus a pointer swap, and the
file that held the previous weights is the one leased next (double buffering: the server never
holds more than two copies of the weights, as with a gRPC stream buffered before its swap). A
backend that cannot adopt (CUDA, vLLM) copies out of the region at the swap instead.

No pickle: the layout (names, dtypes, shapes, offsets) travels in PrepareWeightsUpdate, and the
bytes are the tensors' own. A sender that dies mid-write leaves a half-written region that is
never committed, so it is never adopted; the next update overwrites it.

    region = SharedMemoryRegion.create(layout_of(shapes))       # server
    writer.write(path, size, layout, tensors)                     # sender (ShmWriter)
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger("rpp.weight_transport")

SHM_DIR = "/dev/shm"
"""RAM-backed on Linux; the files live there only while their server runs."""
ALIGN = 64
"""Offsets are cache-line aligned, so every view is aligned for any dtype and for SIMD copies."""
PREFIX = "rpp-weights-"


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in a region."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def layout_of(shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[list[Slot], int]:
    """Every tensor at an aligned offset, in state-dict order; and the region's size in bytes."""
    slots, offset = [], 0
    for name, (dtype, shape) in shapes.items():
        slot = Slot(name, dtype, tuple(shape), offset)
        slots.append(slot)
        offset += -(-slot.nbytes // ALIGN) * ALIGN
    return slots, max(offset, ALIGN)


def view(buffer: mmap.mmap, slot: Slot) -> torch.Tensor:
    """The tensor of `slot` inside a mapped region, sharing its memory."""
    if slot.nbytes == 0:
        return torch.empty(slot.shape, dtype=slot.dtype)
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=slot.nbytes, offset=slot.offset)
    return flat.view(slot.dtype).view(slot.shape)


class SharedMemoryRegion:
    """One file in /dev/shm, mapped; created (and removed) by the server."""

    def __init__(self, path: str, size: int, buffer: mmap.mmap, owner: bool) -> None:
        self.path, self.size, self.buffer, self.owner = path, size, buffer, owner

    @classmethod
    def create(cls, size: int, directory: str = SHM_DIR) -> SharedMemoryRegion:
        """A new file of `size` bytes, readable and writable by this user only, pre-faulted so
        that the first update does not pay the page faults (~8x a copy of resident memory)."""
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        torch.frombuffer(buffer, dtype=torch.uint8).zero_()
        return cls(path, size, buffer, owner=True)

    @classmethod
    def open(cls, path: str, size: int) -> SharedMemoryRegion:
        """Map an existing region (the sender's side); ValueError when it is not that size."""
        fd = os.open(path, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ValueError(f"{path} has {actual} bytes, the server announced {size}")
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(path, size, buffer, owner=False)

    def close(self) -> None:
        """Unmap (views still alive keep the memory until they go); the owner removes the file."""
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        # tensors may still view it (adopted weights): then it is unmapped when they go
        with contextlib.suppress(BufferError):
            self.buffer.close()


def sweep_stale(directory: str = SHM_DIR) -> None:
    """Remove regions left by servers that were killed (their pid no longer runs)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX) :].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(directory, name))
                log.info("removed %s, left by a server that is gone", name)
            except OSError:
                pass
        except (ValueError, PermissionError):
            continue


class ShmWriter:
    """The sender's mappings of the regions it writes into, kept across pushes."""

    def __init__(self) -> None:
        self._regions: dict[str, SharedMemoryRegion] = {}

    def region(self, path: str, size: int) -> SharedMemoryRegion:
        region = self._regions.get(path)
        if region is None or region.size != size:
            if region is not None:
                region.close()
            region = self._regions[path] = SharedMemoryRegion.open(path, size)
        return region

    def write(
        self, path: str, size: int, slots: Iterable[Slot], tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Copy every tensor into its slot (from CPU or a device: one copy each)."""
        region = self.region(path, size)
        for slot in slots:
            view(region.buffer, slot).copy_(tensors[slot.name])

    def forget(self, path: str) -> None:
        """Drop a mapping (its server went away or answered with another region)."""
        region = self._regions.pop(path, None)
        if region is not None:
            region.close()

    def close(self) -> None:
        for path in list(self._regions):
            self.forget(path)
