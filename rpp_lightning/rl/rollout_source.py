"""Where an iteration's rollouts come from (algorithm.md §6 steps 1-2, §9): the one place
generation starts and the one place their scoring starts.

    get(iteration i) ──► a batch asked for ahead (max_staleness k ≥ 1), or sampled now
                     ──► every rank agrees on the worst outcome (a MAX all-reduce):
                           OK       score it (in the background), hand it over
                           TOO_OLD  older than k versions: sample it again on the current weights
                           STALE    no replica serves the trainer's version: push again, resample
                           FAILED   past the retry budget: ServerFailure on every rank
                     ──► ask for the batches of iterations i+1 … i+k (pipeline.py)

Scoring runs in the background while the trainer computes the log-probs: neither needs the
rewards, and the reward servers are other processes (other machines, in a real deployment), so
their time hides behind the trainer's forwards. (On one small CPU machine the two compete for the
same cores instead: about neutral on the 2-core quickstart.) `time/score` is the call's own wall
time, `time/score_wait` what the trainer still waited for it afterwards.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rpp_lightning.clients.generation import SamplingConfig, StaleWeightsError
from rpp_lightning.clients.rewards import RewardBatch, RewardQuery
from rpp_lightning.config import RolloutConfig
from rpp_lightning.rl.distributed import max_over_ranks
from rpp_lightning.rl.experience import Experience, PromptRow, RolloutBatch, pack_rollouts
from rpp_lightning.rl.faults import ServerFailure
from rpp_lightning.rl.pipeline import PendingBatch, RolloutPipeline, RolloutsTooOld
from rpp_lightning.rl.timing import BusyClock, timed
from rpp_lightning.rpc.failures import describe

if TYPE_CHECKING:  # only named in annotations: the servers are built by the module
    from rpp_lightning.rl.trainer_servers import TrainerServers

log = logging.getLogger("rpp.faults")  # what the trainer does when generation fails

MAX_PUSHES = 3  # pushes in a row that no replica kept before the run stops
EMPTY_RESPONSE_REWARD = 0.0
"""Reward of a response with no text (e.g. only EOS): reward servers refuse empty responses."""


class Outcome(enum.IntEnum):
    """How one attempt at a batch's rollouts went on one rank, ordered so that the MAX over the
    ranks is the worst: every rank then acts alike."""

    OK = 0
    TOO_OLD = 1  # asked for ahead, more than max_staleness versions old: sample it again
    STALE = 2  # no replica serves the trainer's version: push again, then sample again
    FAILED = 3  # past the retry budget, or an answer that does not fit: stop the run


@dataclass(frozen=True)
class RolloutStep:
    """Where one rank's iteration stands: what to sample with and which weights must serve it."""

    seed: int  # the sampling seed of the iteration
    weights_version: int  # the servers must serve this version (else StaleWeightsError); for a
    # batch asked for ahead (`at_least`), this one or a newer one
    prompt_offset: int  # this rank's first prompt in the global batch (seeds do not depend on
    # the number of ranks; see ResumableSampler)


def score(servers: TrainerServers, rows: list[PromptRow], rollouts: list, n: int) -> RewardBatch:
    """Rewards of prompt-major rollouts (`rollouts[k*n + j]` answers `rows[k]`)."""
    texts = servers.tokenizer.batch_decode(
        [r.token_ids for r in rollouts], skip_special_tokens=True
    )
    queries, scored = [], []
    for index, text in enumerate(texts):
        if text.strip():
            row = rows[index // n]
            queries.append(RewardQuery(row.prompt, text, row.reference, row.metadata))
            scored.append(index)
    batch = servers.rewards.score(queries) if queries else None
    total = [EMPTY_RESPONSE_REWARD] * len(texts)
    per_source = {s.name: [None] * len(texts) for s in servers.reward_sources}
    empty_verdict = False if servers.has_verifier else None
    correct: list[bool | None] = [empty_verdict if not t.strip() else None for t in texts]
    infos: list[dict[str, str]] = [{} for _ in texts]
    if batch is not None:
        for position, index in enumerate(scored):
            total[index] = batch.total[position]
            correct[index] = batch.correct[position]
            infos[index] = batch.infos[position]
            for name, values in batch.per_source.items():
                per_source[name][index] = values[position]
    return RewardBatch(total=total, per_source=per_source, correct=correct, infos=infos)


class RolloutSource:
    """One rank's rollouts of each iteration, sampled now or asked for ahead, every one from
    weights the trainer accepts: its current ones, or (max_staleness k) at most k versions old."""

    def __init__(
        self,
        servers: TrainerServers,
        rollout: RolloutConfig,
        seed: int,
        rank: int,
        device: torch.device,
        push_again: Callable[[], int],
        batch_of: Callable[[int], list[PromptRow]] | None = None,
    ) -> None:
        """
        Args:
            servers: started; their generation client samples, their reward client scores.
            rollout: what to sample; `max_staleness` ≥ 1 asks for later batches ahead.
            seed: the run's seed (each iteration's sampling seed derives from it).
            rank: this rank in the data-parallel group (its block of each global batch).
            device: where the ranks' agreement is all-reduced (NCCL takes no CPU tensors).
            push_again: pushes the trainer's weights again as a new version and returns the
                version the rollouts must now carry (WeightSync.push_again).
            batch_of: this rank's prompt rows of an iteration, for the batches asked for ahead
                (PromptDataModule.train_batch); needed when max_staleness ≥ 1.
        """
        if rollout.max_staleness and batch_of is None:
            raise ValueError("max_staleness >= 1 asks for batches ahead: it needs batch_of")
        self.servers, self.rollout, self.seed = servers, rollout, seed
        self.rank, self.device = rank, device
        self._push_again, self._batch_of = push_again, batch_of
        staleness = rollout.max_staleness
        self.pipeline = RolloutPipeline(staleness) if staleness else None
        self.generation_busy = BusyClock()  # when generation calls were in flight
        # made here, not on first use: the pipeline's thread and this one both start scorings
        self._scoring = ThreadPoolExecutor(1, thread_name_prefix="rpp-score")

    def get(
        self, iteration: int, rows: list[PromptRow], version: int, timings: dict[str, float]
    ) -> RolloutBatch:
        """This rank's rollouts of `rows` for `iteration`, sampled by `version` (the trainer's)
        or, asked for ahead, by one at most max_staleness older; then ask for the batches ahead.
        A collective. Phase times land in `timings`. ServerFailure past the failure policy."""
        pending = self.pipeline.take(iteration, rows) if self.pipeline else None
        with timed(timings, "rollout_wait"):
            rollouts, scoring, refused, version = self._on_current_weights(
                iteration, rows, version, timings, pending
            )
        self._ask_ahead(iteration, version)  # first: the servers have nothing else to do now
        if scoring is None:  # sampled now, not asked for ahead: its scoring starts now
            scoring = self._start_scoring(rows, rollouts, timings)
        sequences, attention_mask, action_mask = pack_rollouts(
            [row.prompt_ids for row in rows],
            [r.token_ids for r in rollouts],
            self.rollout.n_samples,
            self.servers.tokenizer.pad_token_id,
        )
        unscored = torch.zeros(len(sequences))  # the rewards arrive after the log-probs
        packed = Experience(sequences, attention_mask, action_mask, unscored)
        background = pending.timings if pending is not None else {}
        return RolloutBatch(rollouts, packed, scoring, background, refused)

    def step(self, iteration: int, rows: list[PromptRow], version: int) -> RolloutStep:
        """What `iteration`'s rows are sampled with, by `version` (or, ahead, a newer one)."""
        return RolloutStep(
            seed=self.seed * 1_000_003 + iteration,
            weights_version=version,
            prompt_offset=self.rank * len(rows),  # rank r holds the r-th block
        )

    def _on_current_weights(
        self,
        iteration: int,
        rows: list[PromptRow],
        version: int,
        timings: dict[str, float],
        pending: PendingBatch | None,
    ) -> tuple[list, Future | None, int, int]:
        """(rollouts, their scoring if started, how many were refused as too old, the trainer's
        version now): `pending`'s if the ranks accept them, else sampled now on the current
        weights."""
        step, refused = self.step(iteration, rows, version), 0
        for pushes in range(MAX_PUSHES + 1):
            outcome, error, scoring = Outcome.OK, None, None
            try:
                if pending is not None:
                    taken, pending = pending, None
                    rollouts, scoring = self.pipeline.wait(taken, version)
                else:
                    rollouts = self._generate(rows, step, timings)
            except RolloutsTooOld as exc:
                outcome, error = Outcome.TOO_OLD, exc
                refused += exc.refused
            except StaleWeightsError as exc:
                outcome, error = Outcome.STALE, exc
            except Exception as exc:  # past the retry budget, or an answer that does not fit
                outcome, error = Outcome.FAILED, exc
            outcome = Outcome(max_over_ranks(int(outcome), self.device))
            if outcome is Outcome.OK:
                return rollouts, scoring, refused, version
            reason = describe(error) if error is not None else "failed on another rank"
            if outcome is Outcome.TOO_OLD:  # the servers may well serve the current weights
                log.warning("%s: generating the batch again on the current weights", reason)
                continue
            if outcome is Outcome.FAILED or pushes == MAX_PUSHES:
                raise ServerFailure(f"generation failed: {reason}")
            log.warning(
                "no generation replica serves weights version %d (%s): pushing the trainer's "
                "weights to every replica again",
                step.weights_version,
                reason,
            )
            version = self._push_again()
            step = dataclasses.replace(step, weights_version=version)
        raise AssertionError("unreachable")

    def _ask_ahead(self, iteration: int, version: int) -> None:
        """Ask for the batches of the next max_staleness iterations, sampled by the version the
        servers serve now or a newer one."""
        if self.pipeline is None:
            return
        last = min(iteration + self.rollout.max_staleness, self.rollout.max_iterations - 1)
        for ahead in range(iteration + 1, last + 1):
            rows = self._batch_of(ahead)
            work = functools.partial(
                self._generate_and_score, rows, self.step(ahead, rows, version)
            )
            self.pipeline.ask(ahead, rows, work)

    def _generate_and_score(
        self, rows: list[PromptRow], step: RolloutStep, timings: dict[str, float]
    ) -> tuple[list, Future]:
        """A batch asked for ahead (in the pipeline's thread): sampled by step's version or a
        newer one, then scored in the background."""
        rollouts = self._generate(rows, step, timings, at_least=True)
        return rollouts, self._start_scoring(rows, rollouts, timings)

    def _generate(
        self, rows: list[PromptRow], step: RolloutStep, timings: dict, at_least: bool = False
    ) -> list:
        """This rank's rollouts of `rows` from the generation servers, at step's version (or,
        `at_least`, at it or a newer one)."""
        version = step.weights_version
        generation = self.servers.generation
        with timed(timings, "generate"), self.generation_busy.busy():
            rollouts = generation.generate(
                [row.prompt_ids for row in rows],
                sampling_of(self.rollout, step.seed),
                expected_version=None if at_least else version,
                prompt_offset=step.prompt_offset,
                min_version=version if at_least else None,
            )
        timings["generate_server"] = generation.last_server_s  # the rest is transport
        return rollouts

    def _start_scoring(self, rows: list[PromptRow], rollouts: list, timings: dict) -> Future:
        """Score `rollouts` on the reward servers in the background (times land in `timings`)."""

        def run() -> RewardBatch:
            start = time.perf_counter()
            rewards = score(self.servers, rows, rollouts, self.rollout.n_samples)
            timings["score"] = time.perf_counter() - start
            timings["score_server"] = self.servers.rewards.last_server_s
            return rewards

        return self._scoring.submit(run)

    def generation_idle(self, start: float, end: float) -> float:
        """Seconds of [start, end] (perf_counter) in which no generation call was in flight."""
        return self.generation_busy.idle_between(start, end)

    def close(self) -> None:
        """Cancel what was asked for ahead and stop the scoring thread (a call in flight ends
        when the servers stop)."""
        if self.pipeline is not None:
            self.pipeline.close()
        self._scoring.shutdown(wait=False, cancel_futures=True)


def sampling_of(rollout: RolloutConfig, seed: int) -> SamplingConfig:
    """The generation client's `SamplingConfig` for one iteration's rollouts."""
    return SamplingConfig(
        n=rollout.n_samples,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
        max_new_tokens=rollout.max_new_tokens,
        stop_token_ids=list(rollout.stop_token_ids),
        seed=seed,
    )
