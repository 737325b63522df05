"""Writing the trained policy in Hugging Face format: at the end, and on request mid-run.

`kill -USR1 <pid of rank 0>` asks for an export; it happens after the current iteration, with
every rank taking part (gathering FSDP2 shards is a collective), to `<log dir>/hf_export_iter<N>`.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning.pytorch as pl
from torch import nn

from rpp_lightning.rl.policy import export_hf, full_state_dict

log = logging.getLogger("rpp.export")


class PolicyExport:
    """Where and when the policy is exported; `export_dir` is the module's setting of that name."""

    def __init__(self, export_dir: str | None) -> None:
        self.export_dir = export_dir
        self._requested = False

    def listen_for_signal(self, global_rank: int) -> None:
        """On rank 0 (in the main thread, where signal handlers may be set): SIGUSR1 asks."""
        if global_rank == 0 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        log.info("export requested (SIGUSR1): after the current iteration")
        self._requested = True

    def after_iteration(self, trainer: pl.Trainer, policy: nn.Module, tokenizer, iteration: int):
        """Export if rank 0 was asked to (every rank calls this: they agree by a broadcast)."""
        if trainer.strategy.broadcast(self._requested, src=0):
            self._requested = False
            self.export(
                trainer, policy, tokenizer, self.path(trainer, f"hf_export_iter{iteration}")
            )

    def at_end(self, trainer: pl.Trainer, policy: nn.Module, tokenizer) -> None:
        if self.export_dir is not None:
            self.export(trainer, policy, tokenizer, self.path(trainer))

    def path(self, trainer: pl.Trainer, name: str = "hf_export") -> str:
        if self.export_dir not in (None, "auto") and name == "hf_export":
            return self.export_dir
        root = trainer.log_dir or trainer.default_root_dir
        return str(Path(root) / name)

    @staticmethod
    def export(trainer: pl.Trainer, policy: nn.Module, tokenizer, path: str) -> None:
        """Write `policy` (and `tokenizer`) to `path`; every rank must call this under FSDP."""
        state = full_state_dict(policy)
        if trainer.global_rank == 0:
            export_hf(policy, state, tokenizer, path)
            log.info("exported the policy to %s", path)
        trainer.strategy.barrier("rpp-export")
