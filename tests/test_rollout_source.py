"""The trainer's parts that talk to servers, each without the LightningModule, against
configs/tiny.yaml's real local servers (a transformers generation server, a math-verify reward
server): the rollout source on each outcome its ranks can agree on (OK, TOO_OLD, STALE, FAILED),
the weight pushes it asks for, and the held-out evaluator.

The fault handling of whole runs (killed and restarted servers, the exit status, the resume) is in
test_faults.py; the behaviour policy's log-probs of batches asked for ahead in test_async.py.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port
from tiny_parts import (
    CPU,
    ONE_PROCESS,
    GatedAhead,
    prompt_rows,
    restart_generation_server,
    start_tiny_servers,
    tiny_policy,
    tiny_rollout,
)
from torch import nn
from two_ranks import run_on_two_ranks

from rpp_lightning.clients.generation import GenerationClient, Rollout, StaleWeightsError
from rpp_lightning.clients.rewards import RewardBatch
from rpp_lightning.rl.evaluation import Evaluator, accuracy
from rpp_lightning.rl.experience import PromptRow
from rpp_lightning.rl.faults import ServerFailure
from rpp_lightning.rl.policy import load_causal_lm
from rpp_lightning.rl.rollout_source import MAX_PUSHES, Outcome, RolloutSource
from rpp_lightning.rl.trainer_servers import TrainerServers
from rpp_lightning.rl.weight_sync import WeightSync
from rpp_lightning.rpc.failures import FailurePolicy


@dataclass
class Parts:
    servers: TrainerServers
    policy: nn.Module
    weights: WeightSync  # the servers serve `weights.version` at the start of every test
    rows: list[PromptRow]

    def source(self, push_again=None, **rollout) -> RolloutSource:
        """A rollout source on these servers; `push_again` defaults to WeightSync's."""
        config = tiny_rollout(max_iterations=10, **rollout)
        return RolloutSource(
            self.servers, config, seed=0, rank=0, device=CPU,
            push_again=push_again or functools.partial(self.weights.push_again, self.policy),
            batch_of=(lambda iteration: self.rows) if config.max_staleness else None,
        )  # fmt: skip

    def counted_push_again(self) -> tuple[list[int], Callable[[], int]]:
        """WeightSync's push_again, and the trainer versions it was called at."""
        pushes: list[int] = []

        def push_again() -> int:
            pushes.append(self.weights.version)
            return self.weights.push_again(self.policy)

        return pushes, push_again


@pytest.fixture(scope="module")
def parts():
    config = tiny_policy()
    servers = start_tiny_servers(config)
    try:
        policy = load_causal_lm(config)
        weights = WeightSync(servers)
        weights.connect(ONE_PROCESS)
        weights.ensure_synced(policy)
        yield Parts(servers, policy, weights, prompt_rows())
    finally:
        servers.stop()


def _never() -> int:
    raise AssertionError("no push was needed")


def _versions(got) -> set[int]:
    return {r.weights_version for r in got.rollouts}


def test_rollouts_sampled_now_come_from_the_current_weights_and_are_scored(parts) -> None:
    source, version = parts.source(_never), parts.weights.version
    try:
        timings: dict[str, float] = {}
        got = source.get(0, parts.rows, version, timings)
        assert len(got.rollouts) == 2 * len(parts.rows) and _versions(got) == {version}
        assert got.refused == 0 and got.background == {}  # sampled now, nothing asked ahead
        lengths = got.packed.action_mask.sum(1).tolist()
        assert lengths == [len(r.token_ids) for r in got.rollouts]
        rewards = got.scoring.result(timeout=60)
        assert isinstance(rewards, RewardBatch) and len(rewards.total) == len(got.rollouts)
        assert {"rollout_wait", "generate", "generate_server", "score"} <= timings.keys()
        # the sampling seed is the iteration's: the same iteration samples the same tokens
        again = source.get(0, parts.rows, version, {})
        assert [r.token_ids for r in again.rollouts] == [r.token_ids for r in got.rollouts]
        later = source.get(1, parts.rows, version, {})
        assert [r.token_ids for r in later.rollouts] != [r.token_ids for r in got.rollouts]
    finally:
        source.close()


def test_a_version_no_replica_serves_is_pushed_again_then_sampled(parts, caplog) -> None:
    pushes, push_again = parts.counted_push_again()
    source, served = parts.source(push_again), parts.weights.version
    try:
        # the trainer's version moved on, but its push reached no replica (faults.py)
        with caplog.at_level(logging.WARNING, logger="rpp.faults"):
            got = source.get(0, parts.rows, served + 1, {})
        assert f"no generation replica serves weights version {served + 1}" in caplog.text
        assert len(pushes) == 1 and parts.weights.version == served + 1
        assert _versions(got) == {served + 1}
    finally:
        source.close()


def test_pushes_that_no_replica_keeps_stop_the_run_after_the_bound(parts) -> None:
    pushes = []

    def push_nowhere() -> int:  # the version moves on; no replica ever serves it
        pushes.append(None)
        return parts.weights.version + 10 + len(pushes)

    source = parts.source(push_nowhere)
    try:
        with pytest.raises(ServerFailure, match="generation failed: StaleWeightsError"):
            source.get(0, parts.rows, parts.weights.version + 10, {})
        assert len(pushes) == MAX_PUSHES
    finally:
        source.close()


def test_generation_failing_past_the_budget_stops_without_a_push(parts) -> None:
    short = FailurePolicy(retry_budget_s=0.5, initial_backoff_s=0.1, max_backoff_s=0.2)
    gone = GenerationClient([f"127.0.0.1:{free_port()}"], timeout_s=1, policy=short)
    source = RolloutSource(
        SimpleNamespace(generation=gone), tiny_rollout(), 0, 0, CPU, push_again=_never
    )
    try:
        with pytest.raises(ServerFailure, match=r"generation failed: .*retry budget"):
            source.get(0, parts.rows, parts.weights.version, {})
    finally:
        source.close()
        gone.close()


def test_batches_asked_ahead_are_taken_within_staleness_and_refused_beyond(parts, caplog) -> None:
    source = parts.source(_never, max_staleness=1)
    gate = GatedAhead(parts.servers.generation)
    try:
        version = parts.weights.version
        source.get(0, parts.rows, version, {})  # sampled now; iteration 1's batch asked ahead
        assert gate.done.wait(120)
        gate.done.clear()
        parts.weights.push(parts.policy)  # "the update": one version on
        got = source.get(1, parts.rows, version + 1, {})
        assert _versions(got) == {version} and got.refused == 0  # one behind: allowed
        got.scoring.result(timeout=60)
        assert {"generate", "score"} <= got.background.keys()  # the background's own times
        assert gate.done.wait(120)  # iteration 2's batch, sampled by version + 1
        parts.weights.push(parts.policy)
        parts.weights.push(parts.policy)  # now it is two versions behind
        with caplog.at_level(logging.WARNING, logger="rpp.faults"):
            got = source.get(2, parts.rows, version + 3, {})
        assert f"more than max_staleness 1 behind the trainer's {version + 3}" in caplog.text
        assert "generating the batch again on the current weights" in caplog.text
        assert got.refused == len(got.rollouts) == 2 * len(parts.rows)
        assert _versions(got) == {version + 3}
    finally:
        gate.remove()
        source.close()


def test_rollouts_asked_for_other_prompts_are_sampled_again(parts, caplog) -> None:
    source, version = parts.source(_never, max_staleness=1), parts.weights.version
    try:
        source.get(0, parts.rows, version, {})  # asks ahead for parts.rows
        shuffled = parts.rows[1:] + parts.rows[:1]  # the dataloader's batch is another
        with caplog.at_level(logging.WARNING, logger="rpp.pipeline"):
            got = source.get(1, shuffled, version, {})
        assert "for other prompts than its batch" in caplog.text
        assert got.background == {} and _versions(got) == {version}  # sampled now
        first, packed = shuffled[0].prompt_ids, got.packed  # left-padded prompts, then responses
        prompt_end = packed.sequences.shape[1] - packed.num_actions
        assert packed.sequences[0, prompt_end - len(first) : prompt_end].tolist() == first
    finally:
        source.close()


def test_a_batch_asked_ahead_that_a_restarted_server_refuses_is_pushed_for(parts, caplog) -> None:
    pushes, push_again = parts.counted_push_again()
    source, version = parts.source(push_again, max_staleness=1), parts.weights.version
    gate = GatedAhead(parts.servers.generation)
    try:
        gate.opened.clear()
        source.get(0, parts.rows, version, {})  # iteration 1's batch asked ahead, held back
        restart_generation_server(parts.servers)  # a fresh process at version 0, same address
        gate.opened.set()  # it refuses the batch: older than min_weights_version
        with caplog.at_level(logging.WARNING, logger="rpp.faults"):
            got = source.get(1, parts.rows, version, {})
        assert f"no generation replica serves weights version {version}" in caplog.text
        assert pushes == [version] and parts.weights.version == version + 1
        assert _versions(got) == {version + 1} and got.refused == 0
    finally:
        gate.remove()
        source.close()


def test_evaluator_scores_greedy_answers_of_the_current_weights_only(parts) -> None:
    evaluator, version = Evaluator(parts.servers, max_new_tokens=8), parts.weights.version
    sums = evaluator.batch_sums(parts.rows, version, CPU)
    reward, correct, verified, samples = sums.tolist()
    assert 0 <= reward <= samples  # the math verifier rewards 0 or 1 an answer
    # the math verifier judges every answer (an empty one is wrong): accuracy is defined
    assert samples == verified == len(parts.rows) and 0 <= correct <= verified
    assert accuracy(sums) == correct / verified
    # greedy: the same answers every time, so two batches sum to twice one
    twice = evaluator.sums([parts.rows, parts.rows], version, CPU)
    assert twice.tolist() == (2 * sums).tolist()
    with pytest.raises(StaleWeightsError):  # never evaluated on other weights than the trainer's
        evaluator.batch_sums(parts.rows, version + 1, CPU)


# ---- the ranks' agreement ---------------------------------------------------------------------


class _ScriptedGeneration:
    """A generation client whose calls go as `script` says, one entry a call: "ok", "stale"
    (no replica serves the version asked for) or "fail" (past the retry budget)."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.last_server_s = list(script), 0.0

    def generate(self, prompts, sampling, expected_version=None, prompt_offset=0, min_version=None):
        step = self.script.pop(0)
        if step == "stale":
            raise StaleWeightsError(f"no replica serves weights version {expected_version}")
        if step == "fail":
            raise RuntimeError("no replica answered within the retry budget")
        return [
            Rollout(i, j, [3, 4], [0.0, 0.0], "stop", expected_version)
            for i in range(len(prompts))
            for j in range(sampling.n)
        ]


def _one_case(rank: int, script: list[str]) -> dict:
    """What a rank did: how often it pushed, and its rollouts' versions or why it stopped."""
    rows = [PromptRow("1+1=", [5, 6], "2"), PromptRow("2+2=", [7, 8], "4")]
    pushes = []

    def push_again() -> int:
        pushes.append(None)
        return 5 + len(pushes)

    decode = lambda ids, **_: [""] * len(ids)  # noqa: E731  empty answers: nothing to score
    servers = SimpleNamespace(
        generation=_ScriptedGeneration(script),
        tokenizer=SimpleNamespace(pad_token_id=0, batch_decode=decode),
        rewards=SimpleNamespace(last_server_s=0.0),
        reward_sources=[],
        has_verifier=False,
    )
    source = RolloutSource(servers, tiny_rollout(), 0, rank, CPU, push_again=push_again)
    try:
        got = source.get(0, rows, 5, {})
        return {"pushes": len(pushes), "versions": sorted(_versions(got))}
    except ServerFailure as exc:
        return {"pushes": len(pushes), "stopped": str(exc)}
    finally:
        source.close()


def _agreeing_rank(rank: int, scripts: dict[str, list[list[str]]], out: str) -> None:
    seen = {case: _one_case(rank, by_rank[rank]) for case, by_rank in scripts.items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_ranks_act_on_the_worst_outcome_of_any_rank(tmp_path) -> None:
    """One rank's stale weights make every rank push and sample again; one rank's failure
    stops every rank, before any push (the MAX all-reduce of Outcome: OK < STALE < FAILED)."""
    assert Outcome.OK < Outcome.TOO_OLD < Outcome.STALE < Outcome.FAILED
    scripts = {
        "one stale": [["stale", "ok"], ["ok", "ok"]],
        "stale and failed": [["stale"], ["fail"]],
    }
    run_on_two_ranks(_agreeing_rank, scripts, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["one stale"] == {"pushes": 1, "versions": [6]}
        assert seen["stale and failed"]["pushes"] == 0
    assert "StaleWeightsError" in ranks[0]["stale and failed"]["stopped"]
    assert "RuntimeError" in ranks[1]["stale and failed"]["stopped"]
