"""What the trainer does when its servers fail, so that a run loses nothing.

- Every remote call retries within `model.failure_policy` (`replicas.ReplicaSet`): a lost
  replica's work goes to the others, and while a whole service is down for less than the retry
  budget the trainer waits and carries on.
- A generation replica that serves other weights than the trainer's (restarted at version 0, or
  it missed a push) refuses to generate, and its prompts go to the replicas that serve the right
  version. When none does, every rank agrees on it, the trainer pushes its weights to every
  replica again as a new version, and the batch is generated again. No rollout from other
  weights is ever trained on: the servers refuse them and the client checks every version stamp.
- A push that reaches no replica at the end of an iteration does not stop the run: the trainer's
  version still moves on, so the next iteration finds no replica serving it and pushes again.
- Past the budget, the ranks agree on it before their next collective (none is left waiting in
  one), save a checkpoint of the state before this iteration (nothing of it was trained on), and
  raise TrainingInterrupted, which names the service, its addresses and the last status;
  `rpp-train` then exits with EXIT_SERVER_FAILURE.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from rpp_lightning.checkpoints import save_atomically
from rpp_lightning.replicas import describe
from rpp_lightning.strategy import data_parallel_group

log = logging.getLogger("rpp.faults")

EXIT_SERVER_FAILURE = 75
"""`rpp-train`'s exit status when servers failed past the budget (EX_TEMPFAIL: resume later)."""
_MAX_PUSHES = 3  # pushes in a row that no replica kept before the run stops
_OK, _TOO_OLD, _STALE, _FAILED = 0, 1, 2, 3  # agreed by MAX over ranks: the worst wins


class ServerFailure(RuntimeError):
    """A remote call failed past the failure policy; raised on every rank alike."""


class WeightPushError(RuntimeError):
    """A weight push reached no generation replica; raised on every rank alike."""


class TrainingInterrupted(RuntimeError):
    """The run stopped on a server failure, after saving `checkpoint`."""

    def __init__(self, message: str, checkpoint: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def _max_over_ranks(code: int, device: torch.device) -> int:
    group = data_parallel_group()
    if group is None:
        return code
    value = torch.tensor([code], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank of the data-parallel group (a collective)."""
    return bool(_max_over_ranks(int(flag), device))


class SurvivesServerFaults:
    """ReinforcePP's weight pushes and the fault handling of its iteration (a mixin; see the
    module docstring)."""

    def _sync_weights(self) -> None:
        """Push the trainer's weights to every generation server as the next version.

        Every rank takes part in gathering the full state dict; rank 0 streams it. The outcome
        is broadcast so that a failed push stops every rank instead of leaving them waiting.
        """
        from rpp_lightning.policy import full_state_dict

        state = full_state_dict(self.policy)
        version, error = None, None
        if self.global_rank == 0:  # only rank 0 asks: another rank could see the new version
            try:
                # after the first push the servers serve what we pushed: no need to ask again
                served = self.servers.served_version() if not self._synced else 0
                version = max(self.weights_version, served) + 1
                dtype = self.servers.push_dtype(self.device.type)
                self.servers.generation.push_weights(state, version, dtype=dtype)
            except Exception as exc:  # re-raised on every rank below
                error = f"{type(exc).__name__}: {exc}"
        version, error = self.trainer.strategy.broadcast((version, error), src=0)
        if version is not None:  # even if no replica took it: older weights are not the policy
            self.weights_version = version
        if error:
            raise WeightPushError(f"weight push of version {version} failed: {error}")

    def _ensure_synced(self) -> None:
        # Runs after any checkpoint restore and before the first rollout or evaluation, so the
        # servers never sample from weights other than the trainer's.
        if not self._synced:
            self._sync_weights()
            self._synced = True

    def _generate_on_current_weights(
        self, rows: list, step, timings: dict, pending=None
    ) -> tuple[list, Future | None]:
        """This rank's rollouts, every one from the trainer's current weights, or, with
        `pending` (a batch asked for ahead: pipeline.py), from weights at most max_staleness
        versions old; and their scoring if it has started already."""
        from rpp_lightning.generation.client import StaleWeightsError
        from rpp_lightning.pipeline import RolloutsTooOld  # pipeline → rollout → this module

        for pushes in range(_MAX_PUSHES + 1):
            code, error, scoring = _OK, None, None
            try:
                if pending is not None:
                    taken, pending = pending, None
                    rollouts, scoring = self.pipeline.wait(taken, self.weights_version)
                else:
                    rollouts = self.experience.generate(rows, step, timings)
            except RolloutsTooOld as exc:
                code, error = _TOO_OLD, exc
                self.refused_rollouts += exc.refused
            except StaleWeightsError as exc:
                code, error = _STALE, exc
            except Exception as exc:  # past the retry budget, or an answer that does not fit
                code, error = _FAILED, exc
            code = _max_over_ranks(code, self.device)
            if code == _OK:
                return rollouts, scoring
            reason = describe(error) if error is not None else "failed on another rank"
            if code == _TOO_OLD:  # the servers may well serve the current weights: no push
                log.warning("%s: generating the batch again on the current weights", reason)
                continue
            if code == _FAILED or pushes == _MAX_PUSHES:
                self._stop_for_server_failure(f"generation failed: {reason}")
            log.warning(
                "no generation replica serves weights version %d (%s): pushing the trainer's "
                "weights to every replica again",
                step.weights_version,
                reason,
            )
            try:
                self._sync_weights()
            except WeightPushError as exc:
                log.warning("%s", exc)
            step = dataclasses.replace(step, weights_version=self.weights_version)
        raise AssertionError("unreachable")

    def _push_after_update(self) -> None:
        try:
            self._sync_weights()
        except WeightPushError as exc:  # the next iteration finds no replica current: see above
            log.warning("%s; the next iteration pushes again before it generates", exc)

    def _stop_for_server_failure(self, message: str) -> NoReturn:
        """Save the state before this iteration on every rank, then raise TrainingInterrupted."""
        trainer = self.trainer
        callback = trainer.checkpoint_callback
        directory = callback.dirpath if callback is not None and callback.dirpath else None
        directory = directory or str(Path(trainer.default_root_dir) / "checkpoints")
        path = str(Path(directory).resolve() / f"interrupted-iter{self.iteration}.ckpt")
        save_atomically(trainer, path)  # collective: every rank agreed to stop here
        raise TrainingInterrupted(
            f"{message}\nstopped before iteration {self.iteration}; saved {path} "
            f"(resume: rpp-train fit ... --ckpt_path {path})",
            path,
        )
