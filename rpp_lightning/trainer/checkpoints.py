"""Checkpoints every N iterations, written so that a kill at any moment leaves one to resume from.

Lightning's `every_n_train_steps` counts optimizer steps, of which an iteration makes several
(mini-batches × epochs); this callback counts iterations (training steps of ReinforcePP). And it
makes every save atomic, for single files and for FSDP2's sharded directories alike:

1. the checkpoint is written under `<name>.partial` and renamed to `<name>` once every rank is done
   (a rename is atomic: `<name>` is either absent or whole);
2. `last.ckpt` (with `save_last: link`) is switched to it by renaming a new link over the old one,
   so it always names a whole checkpoint;
3. only then is the previous checkpoint deleted (Lightning deletes it before it moves the link).

A kill during a save leaves the previous `last.ckpt` loadable and at most a `.partial` behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal, NoReturn
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from rpp_lightning.rl.faults import TrainingInterrupted


def save_atomically(trainer: pl.Trainer, path: str, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint(path)` (every rank calls it), visible only once complete."""
    partial = f"{path}.partial"
    trainer.save_checkpoint(partial, weights_only)
    if trainer.is_global_zero:
        _remove(path)
        os.replace(partial, path)
    trainer.strategy.barrier("rpp-checkpoint")


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


class IterationCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves every `every_n_iterations` iterations (and after the last),
    atomically (see the module docstring). Other arguments are ModelCheckpoint's; `save_last`
    defaults to "link" and `save_top_k` to 1: one checkpoint on disk, with last.ckpt naming it."""

    def __init__(
        self,
        every_n_iterations: int = 1,
        save_last: bool | Literal["link"] | None = "link",
        save_top_k: int = 1,
        **kwargs,
    ) -> None:
        if every_n_iterations < 1:
            raise ValueError(f"every_n_iterations must be >= 1, got {every_n_iterations}")
        kwargs.update(every_n_train_steps=0, every_n_epochs=0)  # counted here, in iterations
        super().__init__(save_last=save_last, save_top_k=save_top_k, **kwargs)
        self.every_n_iterations = every_n_iterations
        self._deferred_removals: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = getattr(pl_module, "iteration", trainer.global_step)  # iterations completed
        if done % self.every_n_iterations and not trainer.should_stop:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        for path in self._deferred_removals:  # last.ckpt names the new one now
            super()._remove_checkpoint(trainer, path)
        self._deferred_removals.clear()

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        self._deferred_removals.append(filepath)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        save_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            fresh = f"{linkpath}.new"
            _remove(fresh)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), fresh)
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)  # a copy left by another mode: replace cannot swap it
            os.replace(fresh, linkpath)
        trainer.strategy.barrier()


def stop_for_server_failure(trainer: pl.Trainer, iteration: int, message: str) -> NoReturn:
    """Save the state before `iteration` on every rank, then raise TrainingInterrupted.

    Every rank must call this (the save is a collective): callers act on a ServerFailure, which
    every rank raises alike."""
    callback = trainer.checkpoint_callback
    directory = callback.dirpath if callback is not None and callback.dirpath else None
    directory = directory or str(Path(trainer.default_root_dir) / "checkpoints")
    path = str(Path(directory).resolve() / f"interrupted-iter{iteration}.ckpt")
    save_atomically(trainer, path)  # collective: every rank agreed to stop here
    raise TrainingInterrupted(
        f"{message}\nstopped before iteration {iteration}; saved {path} "
        f"(resume: rpp-train fit ... --ckpt_path {path})",
        path,
    )
