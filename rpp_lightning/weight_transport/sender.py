"""The trainer's side of the out-of-band transports: one pass over the tensors for every replica.

A push through shared memory, CUDA IPC or a collective group has three steps per replica, run
for all replicas together: PrepareWeightsUpdate (names, dtypes and shapes checked, the transport
leased; for a collective group the rendezvous first), then one pass over the tensors (each is
written into every shared-memory region, broadcast bucket by bucket into every group, or shared
by handle), then the commit on each replica's UpdateWeights stream, which the server swaps in
atomically. The tensors are read once, as they come (an FSDP2 gather runs layer by layer), so
the extra memory is one bucket, not a copy of the model; only replicas pushed by the gRPC stream
get a CPU copy, kept for their streams.

A replica whose transport is not available (FAILED_PRECONDITION, UNIMPLEMENTED: an older
server; a rendezvous that did not complete) is reported in `fallbacks`: the caller streams to
it by gRPC, now and from then on. Any other failure fails that replica's push, and the old
weights keep serving there.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from rpp_lightning.proto import generation_pb2 as pb
from rpp_lightning.weight_transport import collective
from rpp_lightning.weight_transport.kinds import (
    COLLECTIVE,
    CUDA_IPC,
    SHM,
    TRANSPORT_OF_NAME,
    dtype_from_wire,
    dtype_to_wire,
    host_id,
)
from rpp_lightning.weight_transport.shm import ShmWriter, Slot, view

log = logging.getLogger("rpp.weight_transport")

FALLBACK_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)
"""Statuses of PrepareWeightsUpdate that mean "not this way": push by the gRPC stream."""
_END = object()


def choose(requested: str, info: pb.GenerationServerInfo, on_cuda: bool) -> tuple[str, str]:
    """The transport to push to a replica by, and why it is not the one requested ("" when it
    is): `auto` takes CUDA IPC (CUDA tensors) or shared memory for a server on this host, else
    the gRPC stream; an explicit choice the replica cannot take falls back the same way."""
    accepted = set(info.weight_transports)
    same_host = bool(info.host_id) and info.host_id == host_id()
    if requested == "grpc":
        return "grpc", ""
    if requested == "collective" and COLLECTIVE in accepted:
        return "collective", ""
    if requested == "cuda_ipc" and same_host and on_cuda and CUDA_IPC in accepted:
        return "cuda_ipc", ""
    if requested == "shm" and same_host and SHM in accepted:
        return "shm", ""
    if same_host and on_cuda and CUDA_IPC in accepted:
        chosen = "cuda_ipc"
    elif same_host and SHM in accepted:
        chosen = "shm"
    else:
        chosen = "grpc"
    if requested == "auto":
        return chosen, ""
    why = (
        "the trainer's tensors are not on CUDA" if requested == "cuda_ipc" and not on_cuda
        else "the server is on another host" if requested in ("shm", "cuda_ipc") and not same_host
        else f"the server does not offer it (it takes {sorted(accepted)})"
    )  # fmt: skip
    return chosen, f"{requested} is not possible ({why}); pushing by {chosen}"


def named_specs(
    named_tensors: TensorStream | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype | None,
) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], Iterator[tuple[str, torch.Tensor]]]:
    """The specs of the tensors to push (floating point cast to `dtype`) and a lazy iterator over
    them, each detached, cast and contiguous when it is read."""

    def cast(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d

    if isinstance(named_tensors, TensorStream):
        specs = [(n, cast(d), tuple(s)) for n, d, s in named_tensors.specs]
        items: Iterable = named_tensors.tensors
    else:
        items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        specs = [(n, cast(t.dtype), tuple(t.shape)) for n, t in items]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for (name, tensor), (want, want_dtype, _) in zip(items, specs, strict=True):
            if name != want:
                raise ValueError(f"tensor {name} came where {want} was announced")
            yield name, tensor.detach().to(want_dtype).contiguous()

    return specs, tensors()


class TransportUnavailable(RuntimeError):
    """This replica cannot take weights this way; stream them by gRPC instead."""


@dataclass
class TensorStream:
    """Tensors produced one at a time (an FSDP2 gather), announced ahead by their specs."""

    specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    """(name, dtype, shape) of every tensor, in the order `tensors` yields them."""
    tensors: Iterable[tuple[str, torch.Tensor]]
    device: str = "cpu"
    """Where the tensors will be (CUDA IPC needs CUDA)."""


@dataclass
class Target:
    """One replica to push to out of band."""

    index: int
    address: str
    transport: str  # "shm" | "cuda_ipc" | "collective"
    stub: object
    metadata: tuple = ()


@dataclass
class _Group:
    group_id: str
    group: object


@dataclass
class _Running:
    target: Target
    response: pb.PrepareWeightsUpdateResponse
    messages: queue.Queue = field(default_factory=queue.Queue)
    call: object = None
    error: BaseException | None = None
    slots: dict[str, Slot] = field(default_factory=dict)


class OutOfBandSender:
    """Pushes to replicas by shared memory, CUDA IPC or a collective group; keeps each
    replica's mapping and group across pushes."""

    def __init__(self, timeout_s: float, bucket_bytes: int = collective.DEFAULT_BUCKET_BYTES):
        self.timeout_s, self.bucket_bytes = timeout_s, bucket_bytes
        self.shm = ShmWriter()
        self._groups: dict[int, _Group] = {}
        # address -> the regions it leased (two: the server double-buffers); mapped once each
        self._shm_paths: dict[str, set[str]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rpp-oob")
        self._buckets: list[torch.Tensor | None] = [None, None]

    def close(self) -> None:
        self.shm.close()
        self._groups.clear()
        self._pool.shutdown(wait=False)

    def forget(self, address: str) -> None:
        """Drop what is kept for a replica (it failed: its group or region may be gone)."""
        self._groups.pop(address, None)
        for path in self._shm_paths.pop(address, set()):
            self.shm.forget(path)

    def push(
        self,
        targets: list[Target],
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        keep_cpu_copy: bool,
    ) -> tuple[dict[int, BaseException | None], dict[int, str], list[tuple[str, torch.Tensor]]]:
        """Push to every target. Returns each target's outcome (None: committed), the targets
        to stream by gRPC instead (with why), and CPU copies of the tensors when
        `keep_cpu_copy` or any target fell back."""
        outcomes: dict[int, BaseException | None] = {}
        fallbacks: dict[int, str] = {}
        prepared = list(self._pool.map(lambda t: self._prepare(t, specs, version), targets))
        running: list[_Running] = []
        for target, result in zip(targets, prepared, strict=True):
            if isinstance(result, TransportUnavailable):
                fallbacks[target.index] = str(result)
            elif isinstance(result, BaseException):
                outcomes[target.index] = result
                self.forget(target.address)
            else:
                running.append(self._start(target, result, version))
        copies = self._pass(running, specs, tensors, keep_cpu_copy or bool(fallbacks))
        num_bytes = sum(Slot(n, d, s, 0).nbytes for n, d, s in specs)
        for run in running:
            if run.error is None:
                run.messages.put(pb.UpdateWeightsRequest(
                    commit=pb.WeightsCommit(num_tensors=len(specs), num_bytes=num_bytes)
                ))  # fmt: skip
            run.messages.put(_END)
        for run in running:
            try:
                reply = run.call.result()
                if reply.weights_version != version:
                    raise RuntimeError(f"replica reports version {reply.weights_version}")
                outcomes[run.target.index] = run.error
            except (grpc.RpcError, RuntimeError) as exc:
                outcomes[run.target.index] = run.error or exc
            if outcomes[run.target.index] is not None:
                self.forget(run.target.address)
        return outcomes, fallbacks, copies

    # --- the three steps -------------------------------------------------------------------

    def _prepare(self, target: Target, specs, version: int):
        request = pb.PrepareWeightsUpdateRequest(
            target_version=version, transport=TRANSPORT_OF_NAME[target.transport]
        )
        if target.transport == "collective":
            plan = collective.plan_buckets(
                ((n, Slot(n, d, s, 0).nbytes) for n, d, s in specs), self.bucket_bytes
            )
            request.bucket_bytes.extend(plan.bucket_bytes)
        for name, dtype, shape in specs:
            bucket, offset = plan.places[name] if target.transport == "collective" else (0, 0)
            request.tensors.add(
                name=name, dtype=dtype_to_wire(dtype), shape=shape, offset=offset, bucket=bucket
            )
        try:
            for _ in range(2):  # collective: at most one rendezvous, then the lease
                known = self._groups.get(target.address)
                request.group_id = known.group_id if known else ""
                response = target.stub.PrepareWeightsUpdate(
                    request, timeout=min(self.timeout_s, 60.0), metadata=target.metadata
                )
                if not response.HasField("rendezvous"):
                    return response
                self._join(target, response.rendezvous)
            return RuntimeError("the server asked for a rendezvous twice")
        except grpc.RpcError as exc:
            if exc.code() in FALLBACK_CODES:
                return TransportUnavailable(f"{exc.code().name}: {exc.details()}")
            return exc
        except TransportUnavailable as exc:
            return exc

    def _join(self, target: Target, rendezvous: pb.CollectiveRendezvous) -> None:
        host = rendezvous.host or target.address.rsplit(":", 1)[0].strip("[]")
        timeout = min(rendezvous.timeout_s or 60.0, self.timeout_s)
        try:
            group = collective.join(host, rendezvous.port, rendezvous.group_id,
                                    rendezvous.backend, timeout)  # fmt: skip
        except Exception as exc:  # refused, timed out, no NCCL here: stream instead
            raise TransportUnavailable(
                f"collective rendezvous at {host}:{rendezvous.port} failed: "
                f"{type(exc).__name__}: {str(exc)[:200]}"
            ) from exc
        self._groups[target.address] = _Group(rendezvous.group_id, group)

    def _start(self, target: Target, response, version: int) -> _Running:
        run = _Running(target, response)
        if target.transport == "shm":
            paths = self._shm_paths.setdefault(target.address, set())
            if response.shm_path not in paths and len(paths) >= 2:
                self.forget(target.address)  # a new server at this address: its files are new
                paths = self._shm_paths.setdefault(target.address, set())
            paths.add(response.shm_path)
            run.slots = {
                s.name: Slot(s.name, dtype_from_wire(s.dtype), tuple(s.shape), s.offset)
                for s in response.layout
            }
        header = pb.WeightsHeader(target_version=version, lease_id=response.lease_id)
        run.messages.put(pb.UpdateWeightsRequest(header=header))

        def requests():
            while (message := run.messages.get()) is not _END:
                yield message

        run.call = target.stub.UpdateWeights.future(
            requests(), timeout=self.timeout_s, metadata=target.metadata
        )
        return run

    def _pass(self, running: list[_Running], specs, tensors, keep_cpu_copy: bool):
        """Read every tensor once and hand it to every running push."""
        copies: list[tuple[str, torch.Tensor]] = []
        groups = [r for r in running if r.target.transport == "collective"]
        plan = collective.plan_buckets(
            ((n, Slot(n, d, s, 0).nbytes) for n, d, s in specs), self.bucket_bytes
        )
        current, pending = 0, []
        alive: list[torch.Tensor] = []  # CUDA IPC: shared tensors live until the commit
        for name, tensor in tensors:
            if keep_cpu_copy:
                copies.append((name, tensor.detach().to("cpu", copy=True).contiguous()))
            for run in running:
                if run.error is not None:
                    continue
                try:
                    if run.target.transport == "shm":
                        region = self.shm.region(run.response.shm_path, run.response.shm_bytes)
                        view(region.buffer, run.slots[name]).copy_(tensor)
                    elif run.target.transport == "cuda_ipc":
                        from rpp_lightning.weight_transport import cuda_ipc  # CUDA only

                        alive.append(tensor)
                        message = pb.CudaIpcTensors(tensors=[cuda_ipc.share(name, tensor)])
                        run.messages.put(pb.UpdateWeightsRequest(cuda_ipc=message))
                except Exception as exc:
                    self._fail(run, exc)
            if groups:
                index, offset = plan.places[name]
                if index != current:  # bucket `current` is full: send it while the next fills
                    pending = self._broadcast(groups, plan, current, pending, tensor.device)
                    current = index
                bucket = self._bucket(current, plan, tensor.device)
                flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                bucket[offset : offset + flat.numel()].copy_(flat)
        if groups and plan.bucket_bytes:
            pending = self._broadcast(groups, plan, current, pending, None)
            self._wait(pending)
        return copies

    def _bucket(self, index: int, plan, device) -> torch.Tensor:
        """One of two bucket buffers, kept across pushes (fresh memory costs page faults):
        one is filled while the other is broadcast."""
        size = max(plan.bucket_bytes)
        slot = index % 2
        buffer = self._buckets[slot]
        if buffer is None or buffer.numel() < size or buffer.device != torch.device(device):
            buffer = self._buckets[slot] = torch.empty(size, dtype=torch.uint8, device=device)
        return buffer[: plan.bucket_bytes[index]]

    def _broadcast(self, runs, plan, index: int, pending: list, device) -> list:
        """Start broadcasting bucket `index` to every group, once the one before is through
        (its buffer is the one filled next)."""
        self._wait(pending)
        bucket = self._buckets[index % 2][: plan.bucket_bytes[index]]
        started = []
        for run in runs:
            if run.error is None:
                try:
                    group = self._groups[run.target.address].group
                    started.append((run, collective.broadcast(group, bucket, wait=False)))
                except Exception as exc:
                    self._fail(run, exc)
        return started

    def _wait(self, pending: list) -> None:
        for run, work in pending:
            try:
                work.wait()
            except Exception as exc:  # the server died or gave up: this group is unusable
                self._fail(run, exc)

    def _fail(self, run: _Running, exc: BaseException) -> None:
        run.error = RuntimeError(f"{run.target.transport} push failed: {type(exc).__name__}: {exc}")
        run.messages.put(_END)  # the stream ends without a commit: the server keeps its weights
