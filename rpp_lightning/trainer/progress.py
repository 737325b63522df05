"""Lightning's progress bars, counting the run's iterations instead of an epoch's batches.

An epoch is one pass over the prompts, usually far longer than a run: with tiny.yaml the stock
bar read "Epoch 0/-2  3/5000 • 0:08:36" for a 3-iteration run that was over in a second (5000
batches of 4 prompts, and "-2" is `max_epochs - 1` for the unbounded `max_epochs: -1`). These
bars stop their total at `model.rollout.max_iterations` and title the bar "Epoch N".

`rpp-train` puts one in place of Lightning's default (Rich when `rich` is installed, else TQDM)
unless the configuration disables the bar or brings its own.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE  # Lightning's own test for it


class _StopsAtMaxIterations:
    """Mixed into a Lightning progress bar (before it in the bases)."""

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches  # the epoch's batches, or fewer under max_steps
        rollout = getattr(self.trainer.lightning_module, "rollout", None)
        if rollout is None or total == float("inf"):
            return total
        # every earlier epoch ran to its end, so this one starts at iteration epoch × batches
        started = self.trainer.current_epoch * self.trainer.num_training_batches
        return max(0, min(total, rollout.max_iterations - started))


class IterationTQDMProgressBar(_StopsAtMaxIterations, TQDMProgressBar):
    """TQDM bar whose total is the iterations left in the run."""


class IterationRichProgressBar(_StopsAtMaxIterations, RichProgressBar):
    """Rich bar whose total is the iterations left in the run."""

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's says "Epoch 0/-2" when max_epochs is -1 (epochs are unbounded here); a
        # private hook, so a Lightning upgrade may bring the old title back, nothing worse.
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"


def default_progress_bar() -> ProgressBar:
    """What Lightning would pick (Rich if installed, else TQDM), counting iterations."""
    return IterationRichProgressBar() if _RICH_AVAILABLE else IterationTQDMProgressBar()
