"""Asynchronous rollouts (`rollout.max_staleness`): the behaviour policy's log-probs, the refusal
of rollouts older than allowed, and the pieces that make them (pipeline.py, behaviour.py,
timing.py).

The rollout source's paths (too old, stale, failed) against real servers are in
test_rollout_source.py; the trainer-level runs (2 gloo ranks, resume) in test_trainer.py, and the
equality of `max_staleness: 0` with the synchronous loop is its sharded resume test.
"""

from __future__ import annotations

import copy
import functools
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
from tiny_parts import (
    CPU,
    ONE_PROCESS,
    prompt_rows,
    start_tiny_servers,
    tiny_algorithm,
    tiny_policy,
    tiny_rollout,
)

from rpp_lightning.algorithms import get_estimator, position_ids
from rpp_lightning.rl.behaviour import WeightSnapshots, agreed_ages, behaviour_log_probs
from rpp_lightning.rl.experience import Experience, PromptRow
from rpp_lightning.rl.experience_maker import ExperienceMaker
from rpp_lightning.rl.models import Models
from rpp_lightning.rl.pipeline import RolloutPipeline, RolloutsTooOld
from rpp_lightning.rl.policy import load_causal_lm, response_log_probs
from rpp_lightning.rl.rollout_source import RolloutSource
from rpp_lightning.rl.timing import BusyClock
from rpp_lightning.rl.update import micro_batch_loss
from rpp_lightning.rl.weight_sync import WeightSync


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Stands for an update: every weight moves a little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _by_hand(model: torch.nn.Module, exp: Experience, temperature: float) -> torch.Tensor:
    """log π(response token) per action token, from the logits (zeros past each response)."""
    positions = position_ids(exp.attention_mask)
    with torch.no_grad():
        logits = model(exp.sequences, attention_mask=exp.attention_mask,
                       position_ids=positions).logits  # fmt: skip
    response = exp.num_actions
    logits = logits[:, -response - 1 : -1].float() / temperature
    tokens = exp.sequences[:, -response:]
    picked = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    return picked * exp.action_mask


def test_weight_snapshots_name_the_weights_of_each_version() -> None:
    model = torch.nn.Linear(3, 2)
    original = copy.deepcopy(model.state_dict())
    snapshots = WeightSnapshots()
    snapshots.take(model, 3)  # served as 3, then updated
    _perturb(model, 0)
    updated = copy.deepcopy(model.state_dict())
    snapshots.take(model, 5)  # served as 4 and 5 (a re-push renumbered it), then updated
    _perturb(model, 1)  # the trainer is now at 6
    assert [snapshots.label_of(v, 6) for v in (3, 4, 5, 6)] == [3, 5, 5, None]
    with pytest.raises(KeyError, match="no copy of the weights of version 2"):
        snapshots.label_of(2, 6)  # before the first snapshot: an older update may have made it
    with pytest.raises(ValueError, match="newer"):
        snapshots.label_of(7, 6)
    live = copy.deepcopy(model.state_dict())
    with snapshots.swapped_in(model, 3):
        assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)
    with snapshots.swapped_in(model, 5):
        assert all(torch.equal(model.state_dict()[k], updated[k]) for k in updated)
    assert all(torch.equal(model.state_dict()[k], live[k]) for k in live)  # swapped back
    snapshots.keep_from(4)  # versions ≥ 4 need only the snapshot labelled 5
    assert len(snapshots) == 1 and snapshots.label_of(4, 6) == 5
    with pytest.raises(KeyError, match="version 3"):
        snapshots.label_of(3, 6)
    with pytest.raises(ValueError, match="not within 1"):
        agreed_ages([4, 6], 6, snapshots, 1, None, torch.device("cpu"))
    assert agreed_ages([5, 6, 4], 6, snapshots, 2, None, torch.device("cpu")) == ([1, 0, 1], [0, 1])


def test_busy_clock_counts_the_time_no_call_was_in_flight() -> None:
    clock = BusyClock()
    clock._spans = [[1.0, 3.0], [2.0, 4.0], [6.0, 7.0], [9.5, float("inf")]]  # overlapping calls
    # in [0, 10]: busy 1-4, 6-7 and 9.5-10 (still running): idle 0-1, 4-6, 7-9.5
    assert clock.idle_between(0.0, 10.0) == pytest.approx(5.5)
    assert clock.idle_between(2.5, 5.0) == pytest.approx(1.0)


def test_pipeline_hands_over_what_was_asked_for_and_refuses_what_is_too_old() -> None:
    rows = [PromptRow("1+1=", [5, 6], "2"), PromptRow("2+2=", [7, 8], "4")]

    def sampled_by(version: int):
        def work(timings: dict[str, float]) -> tuple[list, Future]:
            timings["generate"] = 0.5
            return [SimpleNamespace(weights_version=version)] * 4, Future()

        return work

    pipeline = RolloutPipeline(max_staleness=1)
    try:
        pipeline.ask(1, rows, sampled_by(2))
        pipeline.ask(1, rows, sampled_by(0))  # asked for already: not again
        first = pipeline.take(1, rows)
        rollouts, _ = pipeline.wait(first, current=3)  # one version behind: allowed
        assert {r.weights_version for r in rollouts} == {2} and first.timings == {"generate": 0.5}
        pipeline.ask(2, rows, sampled_by(2))
        assert pipeline.take(2, rows[::-1]) is None  # asked for other prompts: not handed over
        pipeline.ask(3, rows, sampled_by(1))
        third = pipeline.take(3, rows)
        with pytest.raises(RolloutsTooOld, match="weights version 1, more than max_staleness 1"):
            pipeline.wait(third, current=3)
    finally:
        pipeline.close()
    with pytest.raises(ValueError, match="max_staleness >= 1"):
        RolloutPipeline(max_staleness=0)


def test_asynchronous_rollouts_use_their_behaviour_policy() -> None:
    """Real servers (tiny.yaml's local generation and math servers): a batch asked for ahead is
    sampled by the version served then; after an update, its log π_old is that version's (by
    hand, and the server's own log-probs agree), and the PPO ratio is π_θ / π_behav."""
    policy_config, rollout = tiny_policy(), tiny_rollout(max_staleness=1, max_iterations=10)
    servers = start_tiny_servers(policy_config)
    source = None
    try:
        rows = prompt_rows()
        policy = load_causal_lm(policy_config)
        reference = load_causal_lm(policy_config, reference=True)
        weights = WeightSync(servers, rollout.max_staleness)
        weights.connect(ONE_PROCESS)
        weights.ensure_synced(policy)  # the servers serve the trainer's weights as version 1
        assert weights.version == 1
        sampled_by = copy.deepcopy(policy)  # π_behav: the weights of version 1
        source = RolloutSource(
            servers, rollout, seed=0, rank=0, device=CPU,
            push_again=functools.partial(weights.push_again, policy), batch_of=lambda i: rows,
        )  # fmt: skip
        source.get(0, rows, weights.version, {})  # iteration 1's batch is asked for ahead
        ahead = source.get(1, rows, weights.version, {})  # taken before any push: version 1
        assert {r.weights_version for r in ahead.rollouts} == {1} and ahead.background

        # "the update": the trainer keeps version 1's weights, then they change; version 2
        weights.keep_before_update(policy)
        _perturb(policy, 0)
        weights.push_after_update(policy)
        assert weights.version == 2
        algorithm = tiny_algorithm()
        estimator = get_estimator(algorithm.advantage_estimator)
        maker = ExperienceMaker(rollout, algorithm, estimator)
        models = Models(policy, weights.version, reference, None, weights.snapshots)
        made = maker.make(ahead, models, {})
        exp, temperature = made.exp, rollout.temperature
        behaviour = _by_hand(sampled_by, exp, temperature)
        current = _by_hand(policy, exp, temperature)
        torch.testing.assert_close(exp.old_log_probs, behaviour, atol=1e-5, rtol=0)
        assert (exp.old_log_probs - current).abs().max() > 0.05  # the update did move them
        # the server's own log-probs (version 1, fp32, temperature 1) are π_behav's too
        engine = torch.zeros_like(behaviour)
        for row, sample in enumerate(ahead.rollouts):
            engine[row, : len(sample.logprobs)] = torch.tensor(sample.logprobs)
        assert temperature == 1.0
        torch.testing.assert_close(engine * exp.action_mask, behaviour, atol=1e-4, rtol=0)
        # the ratio of the loss is π_θ / π_behav, token by token
        tokens = exp.action_mask.sum().float()
        _, stats = micro_batch_loss(policy, exp, tokens, algorithm, estimator, temperature)
        ratio = torch.exp(current - behaviour) * exp.action_mask
        assert float(stats["ratio"]) == pytest.approx(float(ratio.sum() / tokens), rel=1e-4)
        assert float(stats["ratio"]) != pytest.approx(1.0, abs=1e-3)
        # the same rows from the live weights take no snapshot: exactly the synchronous numbers
        log_probs, _ = behaviour_log_probs(
            policy, exp, [0] * len(exp), [0], 2, weights.snapshots,
            lambda model, batch: response_log_probs(
                model, batch.sequences, batch.attention_mask, batch.num_actions, False, 1.0
            ),
        )  # fmt: skip
        torch.testing.assert_close(log_probs * exp.action_mask, current, atol=1e-5, rtol=0)
    finally:
        if source is not None:
            source.close()
        servers.stop()
