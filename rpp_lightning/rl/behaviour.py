"""log π_behav of asynchronous rollouts: the log-probs of the weights that sampled them
(algorithm.md §9).

With `rollout.max_staleness` k ≥ 1 a rollout may come from weights up to k versions older than
the trainer's. Its PPO ratio and its KL reward are taken against the policy that sampled it, so
the trainer keeps a copy of its own weights of each of the last k versions (`WeightSnapshots`)
and recomputes the log-probs with the copy the rollout's version stamp names. The same model
code, dtype and temperature as every other log-prob of the trainer: a rollout of the current
version gets exactly the numbers of the synchronous loop.

Memory: k copies of the policy's parameters (under FSDP2, of this rank's shards), on the device
that holds them. A swap copies one parameter at a time through a temporary, so it adds at most
the largest parameter on top.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rpp_lightning.rl.experience import Experience

LogProbs = Callable[[nn.Module, Experience], tuple[Tensor, Tensor | None]]
"""(log-probs (N, R), entropy (N, R) or None) of a model on a batch, without grad."""


def _local(tensor: Tensor) -> Tensor:
    """The tensor itself, or this rank's shard of an FSDP2 DTensor (which the optimizer updates
    in place, and which the next forward's all-gather reads)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _sharded_parameters(model: nn.Module) -> list[Tensor]:
    """`model`'s parameters as the optimizer holds them: under FSDP2, each rank's shards. (After
    a forward, FSDP2 may leave the root's parameters unsharded until the backward; resharding
    first makes every parameter the sharded one.)"""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return [_local(parameter) for parameter in model.parameters()]


class WeightSnapshots:
    """Copies of the trainer's weights by the version number they were served as.

    A snapshot labelled L is taken just before the update that follows version L, so it holds
    the weights of every version since the previous update up to L (a re-push without an update
    gives the same weights a new number). Version v is then served by the snapshot with the
    smallest label ≥ v, or, when v is the trainer's version, by the live weights. Versions before
    the first snapshot (whose weights may come from an update before it) or before a forgotten
    one have none.
    """

    def __init__(self) -> None:
        self._by_label: dict[int, list[Tensor]] = {}
        self._known_from: int | None = None  # the oldest version whose weights are held

    def __len__(self) -> int:
        return len(self._by_label)

    @torch.no_grad()
    def take(self, model: nn.Module, version: int) -> None:
        """Copy `model`'s weights, which serve `version`, before an update changes them."""
        self._by_label[version] = [p.detach().clone() for p in _sharded_parameters(model)]
        if self._known_from is None:
            self._known_from = version

    def keep_from(self, oldest: int) -> None:
        """Forget the snapshots no version ≥ `oldest` can need (their labels are below it)."""
        for label in [label for label in self._by_label if label < oldest]:
            del self._by_label[label]
            self._known_from = max(self._known_from, label + 1)

    def label_of(self, version: int, current: int) -> int | None:
        """The snapshot serving `version` (None: the live weights, `current`)."""
        if version == current:
            return None
        if version > current:
            raise ValueError(f"rollout version {version} is newer than the trainer's ({current})")
        labels = [label for label in self._by_label if version <= label < current]
        if not labels or version < self._known_from:
            raise KeyError(f"no copy of the weights of version {version} (trainer at {current})")
        return min(labels)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module, label: int | None) -> Iterator[None]:
        """`model` holds the snapshot `label` inside the block (None: nothing changes)."""
        if label is None:
            yield
            return
        snapshot = self._by_label[label]
        self._swap(model, snapshot)
        try:
            yield
        finally:
            self._swap(model, snapshot)

    @staticmethod
    @torch.no_grad()
    def _swap(model: nn.Module, snapshot: list[Tensor]) -> None:
        parameters = _sharded_parameters(model)
        if [p.shape for p in parameters] != [p.shape for p in snapshot]:
            raise RuntimeError("the model's parameters changed since the snapshot")
        for live, saved in zip(parameters, snapshot, strict=True):
            held = live.clone()
            live.copy_(saved)
            saved.copy_(held)


def agreed_ages(
    versions: list[int],
    current: int,
    snapshots: WeightSnapshots,
    max_staleness: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> tuple[list[int], list[int]]:
    """For rollouts of weights `versions` (one per row) and the trainer at `current`: each row's
    age, i.e. how many versions back the weights that serve it were labelled (0: the live ones),
    and the ages present on any rank of `group`, ascending (a collective).

    Raises ValueError if a version is more than `max_staleness` behind `current`."""
    if any(not 0 <= current - version <= max_staleness for version in versions):
        raise ValueError(
            f"rollout versions {sorted(set(versions))} are not within {max_staleness} of the "
            f"trainer's {current}"
        )
    labels = [snapshots.label_of(version, current) for version in versions]
    ages = [0 if label is None else current - label for label in labels]  # ≤ the version's
    present = torch.zeros(max_staleness + 1, dtype=torch.int64)
    present[torch.tensor(sorted(set(ages)), dtype=torch.long)] = 1
    if group is not None:  # on the device: NCCL takes no CPU tensors
        present = present.to(device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    return ages, present.nonzero().flatten().tolist()


def behaviour_log_probs(
    policy: nn.Module,
    exp: Experience,
    ages: list[int],
    present: list[int],
    current: int,
    snapshots: WeightSnapshots,
    log_probs: LogProbs,
) -> tuple[Tensor, Tensor | None]:
    """log π_behav (N, R) and its entropy: row n from the weights `ages[n]` versions back.

    One forward of the whole batch for each age in `present` (from `agreed_ages`), in the same
    order on every rank: FSDP2's forwards are collectives, so a rank runs one even for an age
    none of its rows has.
    """
    out_log_probs, out_entropy = None, None
    age_of_row = torch.tensor(ages, device=exp.sequences.device)
    for age in present:
        with snapshots.swapped_in(policy, None if age == 0 else current - age):
            version_log_probs, version_entropy = log_probs(policy, exp)
        if out_log_probs is None:  # every row, until a later age overwrites its own rows
            out_log_probs, out_entropy = version_log_probs, version_entropy
            continue
        rows = age_of_row == age
        out_log_probs[rows] = version_log_probs[rows]
        if out_entropy is not None:
            out_entropy[rows] = version_entropy[rows]
    return out_log_probs, out_entropy
