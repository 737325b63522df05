"""Rollouts that overlap training: `rollout.max_staleness` k ≥ 1 (algorithm.md §9).

    iteration i:  take batch i (asked for at iteration i − k) ───────┐ meanwhile the generation
                  ask for the batches up to i + k                    │ servers sample batches
                  log π_behav, log π_ref → advantages → update       │ i+1 … i+k and the reward
                  push the new weights as version V + 1             ─┘ servers score them

A batch asked for at iteration j is sampled by the weights the servers serve then, version V_j,
or by a newer version when a push lands before its request runs (the request carries
`min_weights_version` V_j). It is trained at iteration j + k, by V_{j+k} = V_j + k: at most k
versions old. A lag beyond that (a push that reached no replica, a re-push that only renumbered
the weights) makes a batch older than allowed; the trainer refuses it (a warning, and
`staleness/refused`) and generates it again on its current weights.

The background work is one thread, so batches are generated in iteration order, each scored on
the reward servers as soon as its rollouts are back. Nothing of it is checkpointed: a resumed run
starts with nothing in flight (the batches asked for before the save are discarded) and generates
its first batch synchronously; batches in flight when a run ends are cancelled.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from rpp_lightning.data import PromptRow
from rpp_lightning.metrics import timed
from rpp_lightning.rollout import ExperienceMaker, RolloutStep

log = logging.getLogger("rpp.pipeline")


class RolloutsTooOld(RuntimeError):
    """A batch asked for ahead holds rollouts older than `max_staleness` allows."""

    def __init__(self, message: str, refused: int) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass
class PendingBatch:
    """A batch asked for ahead of its iteration."""

    iteration: int
    prompt_ids: list[list[int]]
    future: Future  # → (rollouts, scoring Future)
    timings: dict[str, float] = field(default_factory=dict)  # generate, score: the background's


class RolloutPipeline:
    """Asks for the batches of later iterations in the background and hands them over."""

    def __init__(self, experience: ExperienceMaker, max_staleness: int) -> None:
        if max_staleness < 1:
            raise ValueError(f"a pipeline needs max_staleness >= 1, got {max_staleness}")
        self.experience, self.max_staleness = experience, max_staleness
        self._pending: dict[int, PendingBatch] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="rpp-rollouts")

    def ask(self, iteration: int, rows: list[PromptRow], step: RolloutStep) -> None:
        """Start sampling (then scoring) `rows` for `iteration`, unless already asked for.
        `step.weights_version` is the oldest version accepted."""
        if iteration in self._pending:
            return
        pending = PendingBatch(iteration, [row.prompt_ids for row in rows], Future())

        def work() -> tuple[list, Future]:
            rollouts = self.experience.generate(rows, step, pending.timings, at_least=True)
            return rollouts, self.experience.start_scoring(rows, rollouts, pending.timings)

        pending.future = self._worker.submit(work)
        self._pending[iteration] = pending

    def take(self, iteration: int, rows: list[PromptRow]) -> PendingBatch | None:
        """The batch asked for `iteration`, if it was asked for these very prompts."""
        for stale in [i for i in self._pending if i < iteration]:  # not trained: a skipped step
            self._pending.pop(stale).future.cancel()
        pending = self._pending.pop(iteration, None)
        if pending is not None and pending.prompt_ids != [row.prompt_ids for row in rows]:
            log.warning(
                "the rollouts asked for ahead of iteration %d are for other prompts than its "
                "batch (the dataloader's order is not the sampler's): generating them now",
                iteration,
            )
            pending.future.cancel()
            return None
        return pending

    def wait(self, pending: PendingBatch, current: int) -> tuple[list, Future]:
        """`pending`'s rollouts and their scoring, once back; RolloutsTooOld if any is more than
        max_staleness versions older than `current`; the generation's own error if it failed."""
        rollouts, scoring = pending.future.result()
        oldest = current - self.max_staleness
        too_old = [r.weights_version for r in rollouts if r.weights_version < oldest]
        if too_old:
            scoring.cancel()
            raise RolloutsTooOld(
                f"{len(too_old)} of {len(rollouts)} rollouts of iteration {pending.iteration} "
                f"were made by weights version {min(too_old)}, more than max_staleness "
                f"{self.max_staleness} behind the trainer's {current}",
                len(too_old),
            )
        return rollouts, scoring

    def close(self) -> None:
        """Cancel the batches not started; a call in flight ends when the clients close."""
        for pending in self._pending.values():
            pending.future.cancel()
        self._pending.clear()
        self._worker.shutdown(wait=False, cancel_futures=True)


class OverlapsRollouts:
    """ReinforcePP's side of the pipeline (a mixin): which rollouts an iteration trains on, what
    it asks for ahead, and the weight copies that give their log π_behav (behaviour.py)."""

    def _rollouts_for(
        self, batch: list[PromptRow], timings: dict
    ) -> tuple[list, Future | None, dict[str, float]]:
        """This iteration's rollouts, asked for ahead or generated now (faults.py checks them),
        their scoring if it has started, and the background's phase times (its generate and
        score, written by the time the scoring is done); then ask for the batches ahead."""
        pending = self.pipeline.take(self.iteration, batch) if self.pipeline else None
        self.refused_rollouts = 0
        with timed(timings, "rollout_wait"):
            rollouts, scoring = self._generate_on_current_weights(
                batch, self._rollout_step(self.iteration, batch), timings, pending
            )
        self._ask_ahead()
        return rollouts, scoring, pending.timings if pending is not None else {}

    def _ask_ahead(self) -> None:
        """Ask for the batches of the next max_staleness iterations, sampled by the version the
        servers serve now or a newer one."""
        if self.pipeline is None:
            return
        data = self.trainer.datamodule
        last = min(self.iteration + self.rollout.max_staleness, self.rollout.max_iterations - 1)
        for iteration in range(self.iteration + 1, last + 1):
            rows = data.train_batch(iteration)
            self.pipeline.ask(iteration, rows, self._rollout_step(iteration, rows))

    def _rollout_step(self, iteration: int, rows: list[PromptRow]) -> RolloutStep:
        return RolloutStep(
            seed=self.seed * 1_000_003 + iteration,
            weights_version=self.weights_version,
            prompt_offset=self.global_rank * len(rows),  # rank r holds the r-th block
        )

    def _keep_weights_before_update(self) -> None:
        """Copy the weights of the version being served, for the batches asked for ahead."""
        if self.pipeline is not None:
            self.experience.snapshots.take(self.policy, self.weights_version)

    def _forget_weights_out_of_reach(self) -> None:
        """Drop the copies no rollout within max_staleness of the trainer can need."""
        if self.pipeline is not None:
            self.experience.snapshots.keep_from(self.weights_version - self.rollout.max_staleness)

    def _staleness_metrics(self, rollouts: list, trained_by: int) -> dict[str, float]:
        """Staleness of the rollouts against `trained_by`, the version the update started from."""
        ages = [trained_by - r.weights_version for r in rollouts]
        return {
            "staleness": sum(ages) / len(ages),
            "staleness/max": float(max(ages)),
            "staleness/refused": float(self.refused_rollouts),
        }
