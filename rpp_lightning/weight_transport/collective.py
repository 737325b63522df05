"""Collective transport: broadcasts in a two-process torch.distributed group, trainer → server.

For servers on other hosts. The trainer's default process group belongs to its FSDP ranks, and
`new_group` only groups ranks of that world, so each (trainer rank 0, generation replica) pair
gets a group of its own, built from a `TCPStore` with the public constructors
`ProcessGroupGloo(store, rank, size, timeout)` (CPU tensors; so CI runs it) and
`ProcessGroupNCCL(store, rank, size, options)` (CUDA). The server hosts the store and announces it
over gRPC (PrepareWeightsUpdate's `rendezvous`), the trainer joins as rank 0: the rendezvous
rides on the authenticated control plane. A restarted server has a new group id, so an update
naming the old one is refused and the trainer joins again.

Tensors travel in buckets (flat byte buffers of at most `bucket_bytes`, as the peers do with
~512 MB on GPUs), so neither side holds more than one bucket beyond the update itself. A
broadcast that does not complete within the group's timeout fails on both sides; the group is
then dropped (a gloo or NCCL group is unusable after a failed collective) and rebuilt next time.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rpp_lightning.weight_transport.shm import ALIGN

log = logging.getLogger("rpp.weight_transport")

DEFAULT_BUCKET_BYTES = 32 * 1024 * 1024
"""Bytes per broadcast: large enough that gloo's per-message cost is small (32-64 MB reach
~2.5 GB/s on loopback, 4 MB ~1.2 GB/s), small enough to bound the extra memory."""


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def new_group(store: dist.Store, rank: int, backend: str, timeout_s: float) -> dist.ProcessGroup:
    """A two-rank group over `store` (blocks until both ranks have joined, or times out)."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _timeout(timeout_s)
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    return dist.ProcessGroupGloo(store, rank, 2, _timeout(timeout_s))


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, wait: bool = True):
    """Rank 0's `tensor` into rank 1's (same size); with `wait=False`, the work to wait on."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    work = group.broadcast([tensor], options)
    if wait:
        work.wait()
    return work


class ServerGroup:
    """The server's end of one rendezvous: it hosts the store and joins as rank 1 in a thread,
    so PrepareWeightsUpdate answers at once and the trainer joins in its own time."""

    def __init__(self, backend: str, timeout_s: float, port: int = 0) -> None:
        self.group_id = secrets.token_hex(8)
        self.backend, self.timeout_s = backend, timeout_s
        # The master listens on every interface: the trainer dials the host it reached gRPC on.
        self.store = dist.TCPStore(
            "0.0.0.0", port, 2, True, timeout=_timeout(timeout_s), wait_for_workers=False
        )
        self.port = self.store.port
        self.group: dist.ProcessGroup | None = None
        self.error: str | None = None
        self.broken = False
        self._joined = threading.Event()
        self._buffers: list[torch.Tensor] = []  # reused: fresh memory costs page faults
        threading.Thread(target=self._join, name="rpp-collective-join", daemon=True).start()

    def _join(self) -> None:
        try:
            prefixed = dist.PrefixStore(self.group_id, self.store)
            self.group = new_group(prefixed, 1, self.backend, self.timeout_s)
        except Exception as exc:  # the trainer never came: this group is abandoned
            self.error = f"{type(exc).__name__}: {exc}"
            self.broken = True
        finally:
            self._joined.set()

    @property
    def joining(self) -> bool:
        """The rendezvous is under way: neither joined nor failed yet."""
        return not self._joined.is_set()

    def wait_joined(self, timeout_s: float) -> bool:
        """True once the trainer has joined (False: not yet, or the rendezvous failed)."""
        return self._joined.wait(timeout_s) and self.group is not None and not self.broken

    def receive(self, bucket_bytes: Iterable[int], device: torch.device) -> list[torch.Tensor]:
        """Every bucket, in order, as flat uint8 tensors; the group is broken on any failure."""
        buckets = []
        try:
            for index, size in enumerate(bucket_bytes):
                if index >= len(self._buffers) or self._buffers[index].numel() < size:
                    self._buffers[index : index + 1] = [
                        torch.empty(size, dtype=torch.uint8, device=device)
                    ]
                bucket = self._buffers[index][:size]
                broadcast(self.group, bucket)
                buckets.append(bucket)
        except Exception:
            self.broken = True
            raise
        return buckets


@dataclass
class Bucketed:
    """Where the sender put each tensor: (bucket, byte offset), and the size of each bucket."""

    places: dict[str, tuple[int, int]]
    bucket_bytes: list[int]


def plan_buckets(sizes: Iterable[tuple[str, int]], bucket_bytes: int) -> Bucketed:
    """Consecutive tensors fill a bucket up to `bucket_bytes`; a larger tensor has its own.
    Offsets are 64-byte aligned, so the receiver can view each tensor in its dtype in place."""
    places: dict[str, tuple[int, int]] = {}
    buckets: list[int] = []
    for name, nbytes in sizes:
        start = -(-buckets[-1] // ALIGN) * ALIGN if buckets else 0
        if not buckets or (buckets[-1] and start + nbytes > bucket_bytes):
            buckets.append(0)
            start = 0
        places[name] = (len(buckets) - 1, start)
        buckets[-1] = start + nbytes
    return Bucketed(places, buckets)


def join(host: str, port: int, group_id: str, backend: str, timeout_s: float) -> dist.ProcessGroup:
    """The trainer's end of a rendezvous (rank 0)."""
    store = dist.TCPStore(host, port, 2, False, timeout=_timeout(timeout_s))
    return new_group(dist.PrefixStore(group_id, store), 0, backend, timeout_s)
