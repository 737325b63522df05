"""The server's side of the out-of-band transports: leases, and updates received through them.

The control plane stays gRPC. `PrepareWeightsUpdate` checks the target version and every name,
dtype and shape before any byte moves, and leases what the data travels through (a shared
memory region, the collective group, or nothing for CUDA IPC). The data then moves, and the
UpdateWeights stream (header naming the lease, commit with counts) hands a `WeightsUpdate` to the
servicer, which swaps it in atomically between batches exactly as a streamed one. A lease not
used within the idle limit expires; a transport failure leaves the old weights serving.

    receiver = OutOfBandReceiver(shapes, ReceiverSettings(device="cpu"))
    response = receiver.prepare(request, current_version)          # PrepareWeightsUpdate
    update, release = receiver.receive(header, messages)           # UpdateWeights with lease_id
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from rpp_lightning.proto import generation_pb2 as pb
from rpp_lightning.rpc.serving import StatusError, invalid_argument, quote
from rpp_lightning.weight_transport import cuda_ipc
from rpp_lightning.weight_transport.collective import ServerGroup
from rpp_lightning.weight_transport.kinds import COLLECTIVE, CUDA_IPC, SHM
from rpp_lightning.weight_transport.shm import SharedMemoryRegion, Slot, layout_of, view
from rpp_lightning.weight_transport.wire import (
    ExpectedShapes,
    WeightsUpdate,
    check_tensor,
    dtype_from_wire,
    dtype_to_wire,
)


@dataclass
class ReceiverSettings:
    """What the server accepts out of band."""

    device: str = "cpu"
    """The backend's device: collective buffers and CUDA IPC copies land there."""
    lease_s: float = 60.0
    """A prepared update must start its UpdateWeights stream within this, and a collective
    broadcast must complete within it (the server's update idle limit)."""
    collective_host: str = ""
    """The host the trainer dials for a collective rendezvous; "" = the one it reached gRPC at."""
    whole_model: bool = False
    """Refuse an update that lacks any tensor of the model (BackendInfo.whole_model_updates)."""
    transports: tuple[int, ...] = (SHM, COLLECTIVE, CUDA_IPC)
    """Out-of-band transports offered, where the device allows them."""


@dataclass
class _Lease:
    lease_id: str
    transport: int
    target_version: int
    specs: list[Slot]
    expires: float
    region: SharedMemoryRegion | None = None
    group: ServerGroup | None = None  # collective: the group this lease was checked against
    bucket_bytes: list[int] = field(default_factory=list)
    buckets_of: dict[str, int] = field(default_factory=dict)


class OutOfBandReceiver:
    """Leases and receives the updates whose data does not travel in the gRPC stream."""

    def __init__(self, shapes: ExpectedShapes, settings: ReceiverSettings) -> None:
        self.shapes, self.settings = shapes, settings
        self.device = torch.device(settings.device)
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._regions: list[SharedMemoryRegion] = []
        self._live: SharedMemoryRegion | None = None  # adopted as the model's weights
        self._group: ServerGroup | None = None
        self._layout, self._region_bytes = layout_of(shapes)
        self._slots = {slot.name: slot for slot in self._layout}

    def accepted(self) -> list[int]:
        """STREAM, and the out-of-band transports this server's device allows (GetInfo)."""
        out = [pb.WEIGHT_TRANSPORT_STREAM]
        for transport in self.settings.transports:
            if transport == CUDA_IPC and not (self.device.type == "cuda" and cuda_ipc.available()):
                continue
            out.append(transport)
        return out

    # --- PrepareWeightsUpdate --------------------------------------------------------------

    def prepare(
        self, request: pb.PrepareWeightsUpdateRequest, current_version: int
    ) -> pb.PrepareWeightsUpdateResponse:
        """Validate an update and lease its transport (or, COLLECTIVE, announce a rendezvous)."""
        transport = request.transport
        if transport not in self.accepted() or transport == pb.WEIGHT_TRANSPORT_STREAM:
            name = (
                pb.WeightTransport.Name(transport)
                if transport in pb.WeightTransport.values()
                else transport
            )
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server ({self.device.type}) does not take weights by {name}; use the "
                "UpdateWeights stream",
            )
        if request.target_version <= current_version:
            raise invalid_argument(
                f"target_version {request.target_version} must be greater than the current "
                f"version {current_version}"
            )
        specs = self._checked_specs(request)
        if transport == COLLECTIVE:
            group = self._group
            if group is None or group.group_id != request.group_id or group.broken:
                return pb.PrepareWeightsUpdateResponse(rendezvous=self._new_rendezvous())
            if not group.wait_joined(min(self.settings.lease_s, 30.0)):
                raise StatusError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"collective group {group.group_id} is not joined "
                    f"({group.error or 'timed out'})",
                )
        lease = _Lease(
            secrets.token_hex(12), transport, request.target_version, specs,
            time.monotonic() + self.settings.lease_s,
        )  # fmt: skip
        if transport == COLLECTIVE:
            # the data comes through this group even if a new rendezvous replaces self._group
            lease.group = group
            lease.bucket_bytes = list(request.bucket_bytes)
            lease.buckets_of = {spec.name: spec.bucket for spec in request.tensors}
            self._check_buckets(request)
        with self._lock:
            self._expire()
            if transport != CUDA_IPC and any(
                held.transport == transport for held in self._leases.values()
            ):
                raise StatusError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "another update holds this server's transport; retry when it has ended",
                )
            if transport == SHM:
                lease.region = self._free_region()
            self._leases[lease.lease_id] = lease
        response = pb.PrepareWeightsUpdateResponse(lease_id=lease.lease_id)
        if lease.region is not None:
            response.shm_path = lease.region.path
            response.shm_bytes = lease.region.size
            for slot in specs:
                full = self._slots[slot.name]
                response.layout.add(
                    name=slot.name, dtype=dtype_to_wire(slot.dtype), shape=slot.shape,
                    offset=full.offset,
                )  # fmt: skip
        return response

    def _checked_specs(self, request: pb.PrepareWeightsUpdateRequest) -> list[Slot]:
        if not request.tensors:
            raise invalid_argument("the update carries no tensors")
        specs, seen = [], set()
        for spec in request.tensors:
            dtype = dtype_from_wire(spec.dtype)
            if dtype is None:
                raise invalid_argument(
                    f"tensor {quote(spec.name)}: unknown dtype enum {spec.dtype}"
                )
            if spec.name in seen:
                raise invalid_argument(f"tensor {quote(spec.name)} appears twice")
            seen.add(spec.name)
            check_tensor(spec.name, dtype, tuple(spec.shape), self.shapes)
            specs.append(Slot(spec.name, dtype, tuple(spec.shape), spec.offset))
        missing = sorted(self.shapes.keys() - seen)
        if self.settings.whole_model and missing:
            raise invalid_argument(
                f"this backend takes whole-model updates; {len(missing)} of {len(self.shapes)} "
                f"tensors are missing, e.g. {quote(missing[0])}"
            )
        return specs

    @staticmethod
    def _check_buckets(request: pb.PrepareWeightsUpdateRequest) -> None:
        sizes = request.bucket_bytes
        for spec in request.tensors:
            nbytes = Slot("", dtype_from_wire(spec.dtype), tuple(spec.shape), 0).nbytes
            if (
                spec.bucket >= len(sizes)
                or spec.offset + nbytes > sizes[spec.bucket]
                or spec.offset % 64
            ):
                raise invalid_argument(
                    f"tensor {quote(spec.name)}: bucket {spec.bucket} offset {spec.offset} does "
                    f"not fit the {len(sizes)} announced buckets (64-byte aligned offsets)"
                )

    def _new_rendezvous(self) -> pb.CollectiveRendezvous:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        with self._lock:
            self._expire()  # a lease prepared by a sender that died before its stream began
            if any(lease.transport == COLLECTIVE for lease in self._leases.values()):
                raise StatusError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "an update is being received through the collective group; retry later",
                )
            if self._group is not None and self._group.joining:
                # replacing it would fail the trainer joining it now (two trainers racing);
                # one that never comes is given up within the lease time
                raise StatusError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "another trainer is joining this server's collective group; retry later",
                )
            self._group = ServerGroup(backend, self.settings.lease_s)
            group = self._group
        return pb.CollectiveRendezvous(
            host=self.settings.collective_host,
            port=group.port,
            group_id=group.group_id,
            backend=backend,
            timeout_s=self.settings.lease_s,
        )

    def _free_region(self) -> SharedMemoryRegion:
        held = {id(lease.region) for lease in self._leases.values() if lease.region}
        for region in self._regions:
            if region is not self._live and id(region) not in held:
                return region
        if len(self._regions) >= 2:  # one serves, one is being written
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "this server's shared-memory regions are all in use; retry when the update ends",
            )
        try:
            region = SharedMemoryRegion.create(self._region_bytes)
        except OSError as exc:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION, f"cannot create a shared-memory region: {exc}"
            ) from exc
        self._regions.append(region)
        return region

    def _expire(self) -> None:
        now = time.monotonic()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires < now]:
            del self._leases[lease_id]

    # --- UpdateWeights with a lease --------------------------------------------------------

    def receive(
        self, header: pb.WeightsHeader, messages: Iterator[pb.UpdateWeightsRequest]
    ) -> tuple[WeightsUpdate, dict[str, torch.Tensor] | None, Callable[[bool], None]]:
        """The update of a leased stream (after its header); the complete region to adopt
        (shared memory) or None; and `release(adopted)`, to call once the swap is done or
        failed."""
        with self._lock:
            self._expire()
            lease = self._leases.get(header.lease_id)
        if lease is None:
            raise invalid_argument(
                f"unknown or expired lease {quote(header.lease_id)}; prepare again"
            )
        lease.expires = float("inf")  # in use: not expired while the data arrives
        release = functools.partial(self._release, lease)
        try:
            if header.target_version != lease.target_version:
                raise invalid_argument(
                    f"target_version {header.target_version} is not the prepared "
                    f"{lease.target_version}"
                )
            update = WeightsUpdate(lease.target_version)
            complete = None
            if lease.transport == SHM:
                update.tensors = {
                    s.name: view(lease.region.buffer, self._slots[s.name]) for s in lease.specs
                }
                complete = {s.name: view(lease.region.buffer, s) for s in self._layout}
            elif lease.transport == COLLECTIVE:
                update.tensors = self._receive_buckets(lease)
            messages = self._cuda_ipc(lease, update, messages)
            self._commit(lease, update, messages)
        except BaseException:
            release(False)
            raise
        return update, complete, release

    def _receive_buckets(self, lease: _Lease) -> dict[str, torch.Tensor]:
        group = lease.group
        if group is None or not group.wait_joined(0):
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "the collective group is gone")
        try:
            buckets = group.receive(lease.bucket_bytes, self.device)
        except Exception as exc:  # the sender died or stalled: this group is unusable now
            raise StatusError(
                grpc.StatusCode.ABORTED,
                f"collective receive failed ({type(exc).__name__}); the old weights stay",
            ) from exc
        tensors = {}
        for spec in lease.specs:
            flat = buckets[lease.buckets_of[spec.name]][spec.offset : spec.offset + spec.nbytes]
            tensors[spec.name] = (
                flat.view(spec.dtype).view(spec.shape)
                if spec.nbytes
                else (torch.empty(spec.shape, dtype=spec.dtype, device=self.device))
            )
        return tensors

    def _cuda_ipc(self, lease: _Lease, update: WeightsUpdate, messages: Iterator):
        """Consume CudaIpcTensors messages up to the commit; yield the rest (the commit...)."""
        wanted = {spec.name: spec for spec in lease.specs}
        for message in messages:
            if message.WhichOneof("item") != "cuda_ipc":
                yield message
                continue
            if lease.transport != CUDA_IPC:
                raise invalid_argument("CUDA IPC handles in an update not prepared for CUDA IPC")
            for item in message.cuda_ipc.tensors:
                spec = wanted.get(item.name)
                if spec is None or item.name in update.tensors:
                    raise invalid_argument(
                        f"tensor {quote(item.name)} was not prepared, or repeats"
                    )
                if dtype_from_wire(item.dtype) != spec.dtype or tuple(item.shape) != spec.shape:
                    raise invalid_argument(
                        f"tensor {quote(item.name)} differs from its preparation"
                    )
                try:
                    update.tensors[item.name] = cuda_ipc.open_copy(item, self.device)
                except (RuntimeError, ValueError) as exc:
                    raise invalid_argument(
                        f"cannot open the CUDA IPC handle of {quote(item.name)}: {exc}"
                    ) from exc

    @staticmethod
    def _commit(lease: _Lease, update: WeightsUpdate, messages) -> None:
        stream = iter(messages)
        first = next(stream, None)
        if first is None or first.WhichOneof("item") != "commit":
            raise invalid_argument("a leased UpdateWeights stream must end with its WeightsCommit")
        if next(stream, None) is not None:
            raise invalid_argument("messages after the WeightsCommit")
        update.num_bytes = sum(spec.nbytes for spec in lease.specs)
        got = len(update.tensors)
        if (
            first.commit.num_tensors != len(lease.specs)
            or first.commit.num_bytes != update.num_bytes
            or got != len(lease.specs)
        ):
            raise invalid_argument(
                f"commit says {first.commit.num_tensors} tensors / {first.commit.num_bytes} bytes, "
                f"prepared {len(lease.specs)} / {update.num_bytes}, received {got}"
            )

    def _release(self, lease: _Lease, adopted: bool) -> None:
        with self._lock:
            self._leases.pop(lease.lease_id, None)
            if adopted and lease.region is not None:
                self._live = lease.region  # the region that served before is free again

    def close(self) -> None:
        """Remove the shared-memory files (their memory goes when the last view does)."""
        for region in self._regions:
            region.close()
        self._regions.clear()
