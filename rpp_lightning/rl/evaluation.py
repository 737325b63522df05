"""Held-out evaluation for the trainer: greedy responses to the validation prompts, scored by
the reward servers, summed over ranks; the module logs them as `val/reward` and `val/accuracy`
(its Lightning validation hooks call this part)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from rpp_lightning.clients.generation import SamplingConfig
from rpp_lightning.rl.distributed import data_parallel_group
from rpp_lightning.rl.experience import PromptRow
from rpp_lightning.rl.rollout_source import score

if TYPE_CHECKING:  # only named in annotations: the servers are built by the module
    from rpp_lightning.rl.trainer_servers import TrainerServers


class Evaluator:
    """Greedy responses to held-out prompts, scored: sums of [reward, correct, verified, samples]
    (a float64 tensor of 4) from which reward and accuracy follow."""

    def __init__(self, servers: TrainerServers, max_new_tokens: int) -> None:
        """`servers` must be started before the first evaluation."""
        self.servers, self.max_new_tokens = servers, max_new_tokens

    def batch_sums(self, rows: list[PromptRow], version: int, device: torch.device) -> torch.Tensor:
        """[reward sum, correct, verified, samples] of `rows`, answered by weights `version`."""
        greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens)
        rollouts = self.servers.generation.generate(
            [row.prompt_ids for row in rows], greedy, expected_version=version
        )
        rewards = score(self.servers, rows, rollouts, 1)
        verdicts = [c for c in rewards.correct if c is not None]
        sums = [sum(rewards.total), sum(verdicts), len(verdicts), len(rows)]
        return torch.tensor(sums, dtype=torch.float64, device=device)

    def sums(
        self, batches: Iterable[list[PromptRow]], version: int, device: torch.device
    ) -> torch.Tensor:
        """The sums of every batch of this rank, then of every rank (a collective)."""
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for rows in batches:
            sums += self.batch_sums(rows, version, device)
        return summed_over_ranks(sums)


def summed_over_ranks(sums: torch.Tensor) -> torch.Tensor:
    """`sums` added up over the data-parallel group, in place (a collective)."""
    if data_parallel_group() is not None:
        dist.all_reduce(sums, group=data_parallel_group())
    return sums


def accuracy(sums: torch.Tensor) -> float | None:
    """Held-out accuracy from evaluation sums; None where no verifier judged any answer."""
    verified = float(sums[2])
    return float(sums[1]) / verified if verified else None
