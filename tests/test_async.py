"""Asynchronous rollouts (`rollout.max_staleness`): the behaviour policy's log-probs, the refusal
of rollouts older than allowed, and the pieces that make them (pipeline.py, behaviour.py).

The trainer-level runs (2 gloo ranks, resume) are in test_trainer.py; the equality of
`max_staleness: 0` with the synchronous loop is its sharded resume test.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import ROOT

from rpp_lightning.behaviour import WeightSnapshots, agreed_ages, behaviour_log_probs
from rpp_lightning.cli import cli_main
from rpp_lightning.experience import Experience
from rpp_lightning.metrics import BusyClock
from rpp_lightning.pipeline import RolloutsTooOld
from rpp_lightning.policy import full_state_dict, response_log_probs
from rpp_lightning.update import micro_batch_loss

TOKENIZER = str(ROOT / "assets" / "char_tokenizer")


def _parsed(tmp_path, monkeypatch, *overrides: str):
    """configs/tiny.yaml's ReinforcePP (local generation and math servers, not started) and its
    PromptDataModule on the committed arithmetic prompts."""
    monkeypatch.chdir(tmp_path)
    data = ROOT / "data" / "arithmetic"
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.policy.tokenizer", TOKENIZER,
            "--data.train_path", str(data / "train.jsonl"),
            "--data.val_path", str(data / "val.jsonl"), *overrides]  # fmt: skip
    cli = cli_main(args, run=False)
    return cli.model, cli.datamodule


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Stands for an update: every weight moves a little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _by_hand(model: torch.nn.Module, exp: Experience, temperature: float) -> torch.Tensor:
    """log π(response token) per action token, from the logits (zeros past each response)."""
    positions = (exp.attention_mask.cumsum(1) - 1).clamp(min=0)
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


def test_asynchronous_rollouts_use_their_behaviour_policy_and_old_ones_are_refused(
    tmp_path, monkeypatch, caplog
) -> None:
    """Real servers (tiny.yaml's local generation and math servers): a batch asked for ahead is
    sampled by the version served then; after an update, its log π_old is that version's (by
    hand, and the server's own log-probs agree), and the PPO ratio is π_θ / π_behav; once it
    is 2 versions behind with max_staleness 1, it is refused and generated again; one that a
    restarted server refuses goes through the fault handling (push again, generate again)."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    module, data = _parsed(tmp_path, monkeypatch, "--model.rollout.max_staleness", "1",
                           "--model.rollout.n_samples", "2")  # fmt: skip
    data.setup("fit")
    rows = data.train_rows[:4]
    module.configure_model()
    module.servers.start(SingleDeviceStrategy(device=torch.device("cpu")))
    try:
        generation, policy = module.servers.generation, module.policy
        generation.push_weights(full_state_dict(policy), version=1)
        module.weights_version = 1
        sampled_by = copy.deepcopy(policy)  # π_behav: the weights of version 1
        pipeline = module.pipeline
        for iteration in (1, 2):  # asked for ahead, at least version 1 (served now)
            pipeline.ask(iteration, rows, module._rollout_step(iteration, rows))
        assert pipeline.take(1, rows[1:] + rows[:1]) is None  # other prompts: not handed over
        pipeline.ask(1, rows, module._rollout_step(1, rows))
        first = pipeline.take(1, rows)
        rollouts, scoring = pipeline.wait(first, current=1)
        assert {r.weights_version for r in rollouts} == {1}

        # "the update": the trainer keeps version 1's weights, then they change; version 2
        module.experience.snapshots.take(policy, 1)
        _perturb(policy, 0)
        generation.push_weights(full_state_dict(policy), version=2)
        module.weights_version = 2
        made = module.experience.make(
            rows, rollouts, policy, module.reference, {}, None, scoring, weights_version=2
        )
        exp, temperature = made.exp, module.rollout.temperature
        behaviour = _by_hand(sampled_by, exp, temperature)
        current = _by_hand(policy, exp, temperature)
        torch.testing.assert_close(exp.old_log_probs, behaviour, atol=1e-5, rtol=0)
        assert (exp.old_log_probs - current).abs().max() > 0.05  # the update did move them
        # the server's own log-probs (version 1, fp32, temperature 1) are π_behav's too
        engine = torch.zeros_like(behaviour)
        for row, rollout in enumerate(rollouts):
            engine[row, : len(rollout.logprobs)] = torch.tensor(rollout.logprobs)
        assert temperature == 1.0
        torch.testing.assert_close(engine * exp.action_mask, behaviour, atol=1e-4, rtol=0)
        # the ratio of the loss is π_θ / π_behav, token by token
        tokens = exp.action_mask.sum().float()
        _, stats = micro_batch_loss(policy, exp, tokens, module.algorithm, module.estimator,
                                    temperature)  # fmt: skip
        ratio = torch.exp(current - behaviour) * exp.action_mask
        assert float(stats["ratio"]) == pytest.approx(float(ratio.sum() / tokens), rel=1e-4)
        assert float(stats["ratio"]) != pytest.approx(1.0, abs=1e-3)
        # the same rows from the live weights take no snapshot: exactly the synchronous numbers
        log_probs, _ = behaviour_log_probs(
            policy, exp, [0] * len(exp), [0], 2, module.experience.snapshots,
            lambda model, batch: response_log_probs(
                model, batch.sequences, batch.attention_mask, batch.num_actions, False, 1.0
            ),
        )  # fmt: skip
        torch.testing.assert_close(log_probs * exp.action_mask, current, atol=1e-5, rtol=0)

        # iteration 2's batch (version 1) when the trainer is at 3: 2 versions behind
        generation.push_weights(full_state_dict(policy), version=3)
        module.weights_version = 3
        second = pipeline.take(2, rows)
        with pytest.raises(RolloutsTooOld, match="weights version 1, more than max_staleness 1"):
            pipeline.wait(second, current=3)
        # the trainer's path: refused (logged, counted), then sampled by the current weights
        caplog.set_level(logging.WARNING, logger="rpp.faults")
        again, scoring = module._generate_on_current_weights(
            rows, module._rollout_step(2, rows), {}, second
        )
        assert module.refused_rollouts == len(again) == 8
        assert {r.weights_version for r in again} == {3} and scoring is None
        assert "generating the batch again on the current weights" in caplog.text

        # the fault handling of a batch asked for ahead: the generation server restarts (a
        # fresh process at version 0, same address) before the batch runs; it refuses (older
        # than min_weights_version 3), so the trainer pushes its weights as version 4 and
        # generates the batch on them
        from lightning.pytorch import Trainer

        from rpp_lightning.local_servers import ChildServer

        module.trainer = Trainer(accelerator="cpu", devices=1, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
        old = next(c for c in module.servers.children if c.name == "generation-server")
        port = old.address.rsplit(":", 1)[1]
        old.stop()
        argv = [*old.argv]
        argv[argv.index("--port") + 1] = port
        fresh = ChildServer(argv, name="generation-server")
        module.servers.children.append(fresh)
        pipeline.ask(3, rows, module._rollout_step(3, rows))
        with caplog.at_level(logging.WARNING, logger="rpp.faults"):
            rollouts, _ = module._generate_on_current_weights(
                rows, module._rollout_step(3, rows), {}, pipeline.take(3, rows)
            )
        assert "no generation replica serves weights version 3" in caplog.text
        assert module.weights_version == 4 and {r.weights_version for r in rollouts} == {4}
    finally:
        module.pipeline.close()
        module.experience.close()
        module.servers.stop()
