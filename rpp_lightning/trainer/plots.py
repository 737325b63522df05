"""Training curves as a PNG next to the logs: reward, accuracy, KL and response length by step.

Add it to a config's callbacks; it reads what the module logged (`trainer.callback_metrics`), so
it works with any logger or none:

    trainer:
      callbacks:
        - class_path: rpp_lightning.trainer.plots.TrainingCurves
          init_args: {every_n_steps: 10}

The plot is rewritten every `every_n_steps` steps and at the end, so an interrupted run still
leaves one behind. Training metrics are
drawn raw (faint) and as a 10-step moving average; held-out accuracy (`val/accuracy`, and the
before/after evaluation when the module runs one) as points on the accuracy panel.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger("rpp.plots")

PANELS = (
    ("reward", "reward (mean)"),
    ("accuracy", "accuracy"),
    ("kl", "KL(π_old ‖ π_ref) per token"),
    ("response_length", "response length (tokens)"),
)
"""(metric, title) of the 2×2 panels, in reading order."""


def moving_average(values: list[float], window: int = 10) -> list[float]:
    """Trailing mean over the last `window` finite values (rollout metrics are noisy)."""
    out = []
    for end in range(1, len(values) + 1):
        recent = [v for v in values[max(0, end - window) : end] if math.isfinite(v)]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


class TrainingCurves(pl.Callback):
    """Writes `<log dir>/training_curves.png` (2×2 panels) during and after training."""

    def __init__(self, every_n_steps: int = 10, filename: str = "training_curves.png") -> None:
        """
        Args:
            every_n_steps: rewrite the plot every this many training steps (0: only at the end).
            filename: file name inside the trainer's log directory.
        """
        super().__init__()
        self.every_n_steps, self.filename = every_n_steps, filename
        self.steps: list[int] = []
        self.series: dict[str, list[float]] = {name: [] for name, _ in PANELS}
        self.val_points: list[tuple[int, float]] = []
        self.path: Path | None = None

    def _output_path(self, trainer: pl.Trainer) -> Path:
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / self.filename

    @staticmethod
    def _value(metrics: dict, key: str) -> float:
        value = metrics.get(key)
        return float(value) if value is not None else math.nan

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.steps.append(int(getattr(pl_module, "iteration", trainer.global_step)))
        for name, _ in PANELS:
            self.series[name].append(self._value(metrics, name))
        if self.every_n_steps and len(self.steps) % self.every_n_steps == 0:
            self.write(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/accuracy" not in trainer.callback_metrics:
            return
        step = int(getattr(pl_module, "iteration", trainer.global_step))
        self.val_points.append((step, float(trainer.callback_metrics["val/accuracy"])))

    def on_fit_end(self, trainer, pl_module) -> None:
        # after the module's on_train_end, which runs the "after" evaluation
        self.write(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.steps:  # keep what was measured before the failure or Ctrl-C
            self.write(trainer)

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None = None) -> Path:
        """Draw the panels and save the PNG (rank 0 only); return its path."""
        self.path = self._output_path(trainer)
        if trainer.global_rank != 0:
            return self.path
        import matplotlib

        matplotlib.use("Agg")  # no display needed; safe in servers and CI
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
        for ax, (name, title) in zip(axes.flat, PANELS, strict=True):
            values = self.series[name]
            ax.plot(self.steps, values, color="tab:blue", lw=0.8, alpha=0.35)
            ax.plot(self.steps, moving_average(values), color="tab:blue", label="train (sampled)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        accuracy = axes.flat[1]
        if self.val_points:
            steps, values = zip(*self.val_points, strict=True)
            accuracy.plot(steps, values, "o", color="tab:orange", label="held-out (greedy)")
        self._before_after(accuracy, pl_module)
        # zoom on the data (a 7% → 15% climb is invisible on a 0-100% axis), capped at 100%
        seen = [v for v in self.series["accuracy"] if math.isfinite(v)]
        seen += [v for _, v in self.val_points]
        accuracy.set_ylim(0.0, min(1.02, max(seen, default=0.9) + 0.1))
        accuracy.legend(loc="best", fontsize=8)
        for ax in axes[1]:
            ax.set_xlabel("iteration")
        fig.suptitle("REINFORCE++ training curves")
        fig.tight_layout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path, dpi=100)
        plt.close(fig)
        log.info("wrote %s", self.path)
        return self.path

    def _before_after(self, ax, pl_module) -> None:
        before = getattr(pl_module, "accuracy_before", None)
        after = getattr(pl_module, "accuracy_after", None)
        if before is None or after is None or not self.steps:
            return
        ax.plot(
            [0, self.steps[-1] + 1],
            [before, after],
            "s",
            color="tab:red",
            label=f"held-out before/after: {100 * before:.1f}% → {100 * after:.1f}%",
        )
