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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from rpp_lightning.rl.experience import PromptRow

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


Work = Callable[[dict[str, float]], tuple[list, Future]]
"""Samples, then starts scoring, one batch; phase times land in the dict it is given."""


class RolloutPipeline:
    """Runs the work of the batches of later iterations in the background and hands them over:
    the bookkeeping of `RolloutSource` (rollout_source.py), which says what the work is."""

    def __init__(self, max_staleness: int) -> None:
        if max_staleness < 1:
            raise ValueError(f"a pipeline needs max_staleness >= 1, got {max_staleness}")
        self.max_staleness = max_staleness
        self._pending: dict[int, PendingBatch] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="rpp-rollouts")

    def ask(self, iteration: int, rows: list[PromptRow], work: Work) -> None:
        """Start `work` (sampling, then scoring, `rows`) for `iteration`, unless already asked."""
        if iteration in self._pending:
            return
        pending = PendingBatch(iteration, [row.prompt_ids for row in rows], Future())
        pending.future = self._worker.submit(work, pending.timings)
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
