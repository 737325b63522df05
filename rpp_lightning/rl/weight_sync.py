"""The trainer's weights on the generation servers (algorithm.md §6 step 6, §9).

`WeightSync.version` is the version of the weights the generation servers serve, and the only
place it changes: after each update the trainer pushes its weights as the next version, after a
restore it pushes them before anything is sampled or evaluated, and when no replica serves its
version any more (a restarted server) the rollout source asks it to push again. With
`rollout.max_staleness` k ≥ 1 it also keeps a copy of the weights of each of the last k versions
(`behaviour.WeightSnapshots`): the log π_behav of rollouts sampled by an older version.

Lightning builds the module, and so this part, before the trainer exists; `connect` hands it the
strategy (which rank streams, and how the outcome reaches the others) in `setup`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from rpp_lightning.rl.behaviour import WeightSnapshots
from rpp_lightning.rl.distributed import Ranks
from rpp_lightning.rl.faults import WeightPushError
from rpp_lightning.weight_transport.sender import TensorStream

if TYPE_CHECKING:  # only named in annotations: the servers are built by the module
    from rpp_lightning.rl.trainer_servers import TrainerServers

log = logging.getLogger("rpp.faults")  # what a push that failed did next: fault handling


class WeightSync:
    """Pushes the trainer's weights to every generation replica, and knows which version they
    serve."""

    def __init__(self, servers: TrainerServers, max_staleness: int = 0) -> None:
        """`servers` must be started before the first push."""
        self.servers, self.max_staleness = servers, max_staleness
        self.version = 0  # of the weights the generation servers serve (checkpointed)
        # the weights of the last max_staleness versions; None: synchronous rollouts need none
        self.snapshots = WeightSnapshots() if max_staleness else None
        self._ranks: Ranks | None = None
        self._synced = False  # pushed since this process started or restored a checkpoint

    def connect(self, ranks: Ranks) -> None:
        """The ranks to push from: rank 0 streams, every rank learns the outcome."""
        self._ranks = ranks

    def push(self, policy: nn.Module) -> None:
        """Push `policy`'s weights to every generation server as the next version.

        Every rank takes part in gathering the full state dict; rank 0 streams it. The outcome
        is broadcast so that a failed push stops every rank instead of leaving them waiting:
        WeightPushError on every rank alike.
        """
        ranks = self._ranks
        if ranks is None:
            raise RuntimeError("WeightSync.connect(ranks) must come before a push")
        stream = full_state_stream(policy)  # gathered tensor by tensor as it is sent
        version, error = None, None
        if ranks.global_rank == 0:  # only rank 0 asks: another rank could see the new version
            try:
                # after the first push the servers serve what we pushed: no need to ask again
                served = self.servers.served_version() if not self._synced else 0
                version = max(self.version, served) + 1
                dtype = self.servers.push_dtype(ranks.root_device.type)
                self.servers.generation.push_weights(stream, version, dtype=dtype)
            except Exception as exc:  # re-raised on every rank below
                error = f"{type(exc).__name__}: {exc}"
        for _ in stream.tensors:  # the other ranks gather in step; rank 0 what a failure left
            pass
        version, error = ranks.broadcast((version, error), src=0)
        if version is not None:  # even if no replica took it: older weights are not the policy
            self.version = version
        if error:
            raise WeightPushError(f"weight push of version {version} failed: {error}")

    def ensure_synced(self, policy: nn.Module) -> None:
        """Push unless done since the start or the last restore. Runs before the first rollout
        or evaluation, so the servers never sample from weights other than the trainer's."""
        if not self._synced:
            self.push(policy)
            self._synced = True

    def push_after_update(self, policy: nn.Module) -> None:
        """The push that ends an iteration; one that reaches no replica does not stop the run."""
        try:
            self.push(policy)
        except WeightPushError as exc:  # the next iteration finds no replica current: it pushes
            log.warning("%s; the next iteration pushes again before it generates", exc)

    def push_again(self, policy: nn.Module) -> int:
        """Push once more when no replica serves the trainer's version (a restarted server);
        the version the rollouts must now carry (moved on even if the push reached none)."""
        try:
            self.push(policy)
        except WeightPushError as exc:  # the rollout source tries again, within its bound
            log.warning("%s", exc)
        return self.version

    def restore(self, version: int) -> None:
        """After a checkpoint restore: the servers may serve anything, so push before use."""
        self.version = version
        self._synced = False

    def keep_before_update(self, policy: nn.Module) -> None:
        """Copy the weights of the version being served, for the batches asked for ahead."""
        if self.snapshots is not None:
            self.snapshots.take(policy, self.version)

    def forget_out_of_reach(self) -> None:
        """Drop the copies no rollout within max_staleness of the trainer can need."""
        if self.snapshots is not None:
            self.snapshots.keep_from(self.version - self.max_staleness)


def full_state_stream(model: nn.Module) -> TensorStream:
    """The full parameters and buffers for a weight push, gathered one tensor at a time as the
    stream is read: never more than one unsharded tensor beyond what the transport holds (no
    copy of the whole model on the GPU). Under FSDP2 every rank must read the whole stream, in
    step (each read all-gathers); rank 0 pushes what it reads, the others discard it."""
    state = model.state_dict()  # DTensors under FSDP2: their shape and dtype are the full ones
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
    device = next((t.device.type for t in state.values()), "cpu")

    def gathered():
        for name, tensor in state.items():
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            yield name, full.detach()

    return TensorStream(specs, gathered(), device)
