"""Held-out evaluation for the trainer: greedy responses to the validation prompts, scored by
the reward servers, summed over ranks; logged as `val/reward` and `val/accuracy`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rpp_lightning.data import PromptRow
from rpp_lightning.strategy import data_parallel_group


class HeldOutEvaluation:
    """Lightning's validation hooks and `evaluate()`, mixed into the LightningModule.

    Expects `self.servers`, `self.eval_max_new_tokens`, `self.weights_version` and
    `self._ensure_synced()` from the module.
    """

    _val_sums: torch.Tensor | None = None

    def _evaluate_batch(self, batch: list[PromptRow]) -> torch.Tensor:
        """Greedy responses to `batch`, scored: [reward sum, correct, verified, samples]."""
        sums = self.servers.evaluate(batch, self.eval_max_new_tokens, self.weights_version)
        return torch.tensor(sums, dtype=torch.float64, device=self.device)

    def _evaluate_all(self) -> torch.Tensor:
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for batch in self.trainer.datamodule.val_dataloader():
            sums += self._evaluate_batch(batch)
        if data_parallel_group() is not None:
            dist.all_reduce(sums, group=data_parallel_group())
        return sums

    def _log_evaluation(self, sums: torch.Tensor, prefix: str) -> float | None:
        """Log held-out reward and (where a verifier judged) accuracy; return the accuracy."""
        reward_sum, correct, verified, samples = sums.tolist()
        # `sums` is already the same on every rank; sync_dist only keeps Lightning's
        # epoch-level bookkeeping consistent across ranks.
        self.log(f"{prefix}/reward", reward_sum / max(samples, 1), batch_size=1, sync_dist=True)
        if not verified:
            return None
        accuracy = correct / verified
        self.log(f"{prefix}/accuracy", accuracy, prog_bar=True, batch_size=1, sync_dist=True)
        return accuracy

    def evaluate(self) -> float | None:
        """Held-out accuracy of the current policy (outside Lightning's validation loop)."""
        self._ensure_synced()
        sums = self._evaluate_all()
        verified = float(sums[2])
        return float(sums[1]) / verified if verified else None

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: list[PromptRow], batch_idx: int) -> None:
        self._val_sums += self._evaluate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        if data_parallel_group() is not None:
            dist.all_reduce(self._val_sums, group=data_parallel_group())
        self._log_evaluation(self._val_sums, "val")
