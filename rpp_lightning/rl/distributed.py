"""The collectives the iteration's parts need, and what they need of the training strategy.

Every process is one data-parallel rank (FSDP2 over all of them, trainer/strategy.py). The parts
take a `Ranks` (Lightning's `Strategy` is one) instead of the strategy itself, so they run and
are tested without Lightning.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class Ranks(Protocol):
    """Which rank this process is, where its tensors live, and a broadcast from rank 0."""

    @property
    def global_rank(self) -> int: ...

    @property
    def root_device(self) -> torch.device: ...

    def broadcast(self, obj: T, src: int = 0) -> T: ...


class SingleProcess:
    """`Ranks` of a run without a process group (tests of one part, scripts)."""

    global_rank = 0

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.root_device = torch.device(device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


def data_parallel_group() -> dist.ProcessGroup | None:
    """The data-parallel group: every process (see FSDP2Strategy), or None in one process."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest `value` of any rank of the data-parallel group (a collective; `device`: where
    NCCL wants the tensor). Outcomes are ordered so that this picks the worst one."""
    group = data_parallel_group()
    if group is None:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank of the data-parallel group (a collective)."""
    return bool(max_over_ranks(int(flag), device))
