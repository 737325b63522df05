"""The trainer's parts: YAML → computation, data loading and sharding, reward routing."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import ROOT

from rpp_lightning.cli import cli_main
from rpp_lightning.clients.rewards import RewardClient, RewardQuery
from rpp_lightning.config import RewardSource, RolloutConfig
from rpp_lightning.rl.experience import Experience, pack_rollouts
from rpp_lightning.rl.update import PolicyUpdateConfig, micro_batch_loss, policy_update
from rpp_lightning.rpc.server_config import ServerConfig
from rpp_lightning.rpc.serving import GrpcServer
from rpp_lightning.trainer.data import PromptDataModule, ResumableSampler, read_rows

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TRAINER_CONFIGS = [p for p in CONFIGS if not p.name.startswith("sft")]
TOKENIZER = str(ROOT / "assets" / "char_tokenizer")


@pytest.mark.parametrize("config", TRAINER_CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_against_the_code(config, capsys) -> None:
    # Configs cannot drift from the module signatures: each must parse and validate.
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "advantage_estimator" in capsys.readouterr().out


def _module(tmp_path, monkeypatch, estimator: str, kl_coef: float = 0.1):
    monkeypatch.chdir(tmp_path)
    args = [
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--model.algorithm.advantage_estimator", estimator,
        "--model.algorithm.kl_coef", str(kl_coef),
        "--model.policy.tokenizer", TOKENIZER,
    ]  # fmt: skip
    return cli_main(args, run=False).model


def _experience() -> Experience:
    # 2 prompts × 2 samples, responses of different lengths, fixed log-probs
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11, 12], [13], [14, 15], [16, 17, 18, 19]]
    sequences, attention, actions = pack_rollouts(prompts, responses, 2, pad_token_id=0)
    exp = Experience(sequences, attention, actions, torch.tensor([1.0, 0.0, 0.5, 0.25]))
    generator = torch.Generator().manual_seed(0)
    exp.old_log_probs = -torch.rand(actions.shape, generator=generator) * actions
    exp.ref_log_probs = -torch.rand(actions.shape, generator=generator) * actions
    return exp


def test_pack_rollouts_left_pads_prompts_and_right_pads_responses() -> None:
    # prompt-major: rows 0-1 answer [5, 6, 7], rows 2-3 answer [8, 9]; one response is empty
    sequences, attention, actions = pack_rollouts(
        [[5, 6, 7], [8, 9]], [[10, 11], [], [12], [13, 14]], 2, 0
    )
    assert sequences.tolist() == [
        [5, 6, 7, 10, 11],
        [5, 6, 7, 0, 0],
        [0, 8, 9, 12, 0],
        [0, 8, 9, 13, 14],
    ]
    assert attention.tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 1, 1, 1, 1],
    ]
    assert actions.tolist() == [[1, 1], [0, 0], [1, 0], [1, 1]]
    assert sequences.dtype == attention.dtype == actions.dtype == torch.long
    with pytest.raises(ValueError, match="2 prompts × 2 samples = 4 responses, got 3"):
        pack_rollouts([[5], [6]], [[1], [2], [3]], 2, 0)


def test_estimator_switch_in_yaml_changes_the_computation(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from rpp_lightning.tiny import tiny_llama_config

    policy = AutoModelForCausalLM.from_config(tiny_llama_config())
    results = {}
    for estimator in ["reinforce_pp", "reinforce_pp_baseline", "grpo", "rloo"]:
        module = _module(tmp_path, monkeypatch, estimator)
        exp = _experience()
        module.experience.advantages(exp, exp.rewards)
        tokens = exp.action_mask.sum().float()
        _, stats = micro_batch_loss(policy, exp, tokens, module.algorithm, module.estimator)
        results[estimator] = (exp.advantages, set(stats))
    advantages = {name: adv for name, (adv, _) in results.items()}
    names = list(advantages)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(advantages[a], advantages[b]), f"{a} == {b}"
    mask = _experience().action_mask.bool()
    # reinforce_pp: globally whitened over action tokens
    assert advantages["reinforce_pp"][mask].mean().abs() < 1e-6
    # grpo: one scalar per sample, (R - group mean) / (group std + 1e-6); group 0 = [1.0, 0.0]
    first_group = advantages["grpo"][0][mask[0]]
    expected = (1.0 - 0.5) / (torch.tensor([1.0, 0.0]).std() + 1e-6)
    torch.testing.assert_close(first_group, torch.full_like(first_group, expected.item()))
    # KL goes into the loss (not the reward) only for the estimators that say so
    assert "kl_loss" in results["grpo"][1] and "kl_loss" in results["reinforce_pp_baseline"][1]
    assert "kl_loss" not in results["reinforce_pp"][1] and "kl_loss" not in results["rloo"][1]


def test_group_estimator_with_one_sample_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.policy.tokenizer", TOKENIZER]
    args += ["--model.algorithm.advantage_estimator", "grpo", "--model.rollout.n_samples", "1"]
    with pytest.raises(ValueError, match=r"grpo.*n_samples >= 2"):
        cli_main(args, run=False)


def test_log_probs_are_taken_at_the_sampling_temperature(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from rpp_lightning.rl.policy import response_log_probs
    from rpp_lightning.tiny import tiny_llama_config

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(tiny_llama_config())
    exp = _experience()
    logits = policy(input_ids=exp.sequences, attention_mask=exp.attention_mask).logits
    # the left padding shifts positions: compare the rows without it (prompt 0, 3 tokens)
    row, prompt = 0, exp.sequences.shape[1] - exp.num_actions
    R = exp.num_actions
    for temperature in (1.0, 0.5, 2.0):
        expected = torch.log_softmax(logits[row, prompt - 1 : prompt - 1 + R] / temperature, -1)
        expected = expected.gather(-1, exp.sequences[row, prompt:, None])[:, 0]
        got, _ = response_log_probs(
            policy, exp.sequences, exp.attention_mask, R, temperature=temperature
        )
        assert torch.allclose(got[row], expected, atol=1e-5), temperature
    # the loss takes them at the configured temperature: T = 2 gives another ratio than T = 1
    module = _module(tmp_path, monkeypatch, "reinforce_pp")
    module.experience.advantages(exp, exp.rewards)
    exp.old_log_probs = (
        response_log_probs(policy, exp.sequences, exp.attention_mask, R, temperature=2.0)[
            0
        ].detach()
        * exp.action_mask
    )
    tokens = exp.action_mask.sum().float()
    at = {
        t: micro_batch_loss(policy, exp, tokens, module.algorithm, module.estimator, t)[1]["ratio"]
        for t in (1.0, 2.0)
    }
    assert torch.allclose(at[2.0], torch.tensor(1.0), atol=1e-5)  # on-policy: ratio 1
    assert not torch.allclose(at[1.0], torch.tensor(1.0), atol=1e-3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RolloutConfig(temperature=0.0).validate()


def test_policy_update_steps_once_per_mini_batch_and_epoch(tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from rpp_lightning.rl.policy import response_log_probs
    from rpp_lightning.tiny import tiny_llama_config

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(tiny_llama_config())
    module = _module(tmp_path, monkeypatch, "reinforce_pp")
    exp = _experience()
    module.experience.advantages(exp, exp.rewards)
    with torch.no_grad():  # on-policy, so the clip leaves gradients to take
        old, _ = response_log_probs(policy, exp.sequences, exp.attention_mask, exp.num_actions)
    exp.old_log_probs = old * exp.action_mask
    algorithm = replace(module.algorithm, epochs=2, mini_batch_size=2, micro_batch_size=1)
    config = PolicyUpdateConfig(algorithm, module.estimator)
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)  # small: no token gets clipped
    backwards = []

    def backward(loss: torch.Tensor) -> None:
        backwards.append(loss.item())
        loss.backward()

    steps = policy_update(
        policy, optimizer, exp, config, backward, torch.Generator().manual_seed(0)
    )
    # 4 rows: 2 epochs × 2 mini-batches = 4 optimizer steps, each of 2 micro-batches
    assert len(steps) == 4 and len(backwards) == 8
    assert all(torch.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 for s in steps)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    assert all(p.grad is None for p in policy.parameters())  # zeroed after the last step
    with pytest.raises(ValueError, match="not a multiple of mini_batch_size 3"):
        uneven = PolicyUpdateConfig(replace(algorithm, mini_batch_size=3), module.estimator)
        policy_update(policy, optimizer, exp, uneven, backward, torch.Generator())


def test_critic_is_built_for_ppo_only_from_the_policys_weights(tmp_path, monkeypatch) -> None:
    from rpp_lightning.rl.critic import CriticModel

    for estimator in ["reinforce_pp", "reinforce_pp_baseline", "grpo", "rloo"]:
        module = _module(tmp_path, monkeypatch, estimator)
        module.configure_model()
        assert module.critic_config is None and module.critic is None, estimator
        optimizers, _ = module.configure_optimizers()
        assert len(optimizers) == 1
    module = _module(tmp_path, monkeypatch, "ppo")
    module.configure_model()
    assert isinstance(module.critic, CriticModel)
    optimizers, schedulers = module.configure_optimizers()
    assert len(optimizers) == len(schedulers) == 2
    assert optimizers[1].param_groups[0]["lr"] == module.critic_config.optim.lr
    # the decoder starts as the policy's (its LM head dropped), with a small fresh value head
    policy = module.policy.model.state_dict()
    critic = module.critic.model.state_dict()
    assert policy.keys() == critic.keys()
    assert all(torch.equal(policy[k], critic[k]) for k in policy)
    assert 0 < module.critic.value_head.weight.abs().max() < 1


def test_kl_coef_zero_loads_and_runs_no_reference_model(tmp_path, monkeypatch) -> None:
    from rpp_lightning.clients.generation import Rollout
    from rpp_lightning.clients.rewards import RewardBatch
    from rpp_lightning.rl.metrics import rollout_metrics

    with_kl = _module(tmp_path, monkeypatch, "grpo")
    with_kl.configure_model()
    assert with_kl.reference is not None
    module = _module(tmp_path, monkeypatch, "grpo", kl_coef=0.0)
    module.configure_model()
    assert module.reference is None  # nothing loaded, nothing run
    # without log π_ref: the advantages of a KL-free run, no KL loss term, no KL metric
    exp, expected = _experience(), _experience()
    exp.ref_log_probs = None
    module.experience.advantages(exp, exp.rewards)
    module.experience.advantages(expected, expected.rewards)  # kl_coef 0: the KL weighs nothing
    torch.testing.assert_close(exp.advantages, expected.advantages)
    tokens = exp.action_mask.sum().float()
    _, stats = micro_batch_loss(module.policy, exp, tokens, module.algorithm, module.estimator)
    assert "kl_loss" not in stats
    _, stats = micro_batch_loss(
        with_kl.policy, expected, tokens, with_kl.algorithm, with_kl.estimator
    )
    assert "kl_loss" in stats
    lengths = exp.action_mask.sum(1).tolist()
    rollouts = [
        Rollout(i, 0, [1] * int(n), [0.0] * int(n), "stop", 3) for i, n in enumerate(lengths)
    ]
    rewards = RewardBatch(exp.rewards.tolist(), {}, [None] * 4, [{}] * 4)
    assert rollout_metrics(exp, rollouts, rewards, 8)["kl"] is None
    assert rollout_metrics(expected, rollouts, rewards, 8)["kl"] > 0


def test_critic_value_loss_on_a_fixed_batch_falls(tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    from rpp_lightning.rl.critic import experience_values
    from rpp_lightning.rl.update import critic_update

    module = _module(tmp_path, monkeypatch, "ppo")
    algorithm = replace(module.algorithm, mini_batch_size=4)
    module.configure_model()
    optimizer = torch.optim.AdamW(module.critic.parameters(), lr=1e-2)
    exp = _experience()
    exp.values = experience_values(module.critic, exp, 4)
    module.experience.advantages(exp, exp.rewards)  # GAE on the critic's values
    # by hand, row by row: δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}, G_t = A_t + V_t,
    # with r_t = −β k1_t and + R on the last token (γ = 1, λ = gae_lambda, β = kl_coef = 0.1)
    lam, beta = module.algorithm.gae_lambda, module.algorithm.kl_coef
    for row in range(len(exp)):
        n = int(exp.action_mask[row].sum())
        v = [*exp.values[row, :n].tolist(), 0.0]
        kl = (exp.old_log_probs[row, :n] - exp.ref_log_probs[row, :n]).tolist()
        r = [-beta * k for k in kl]
        r[-1] += float(exp.rewards[row])
        advantage, expected = 0.0, [0.0] * n
        for t in reversed(range(n)):
            advantage = r[t] + v[t + 1] - v[t] + lam * advantage
            expected[t] = advantage + v[t]
        torch.testing.assert_close(exp.returns[row, :n], torch.tensor(expected), atol=1e-5, rtol=0)
    before = exp.values.clone()
    losses = []
    for _ in range(6):
        steps = critic_update(
            module.critic, optimizer, exp, algorithm, module.critic_config,
            lambda loss: loss.backward(), torch.Generator().manual_seed(0),
        )  # fmt: skip
        losses.append(float(steps[0]["critic/value_loss"]))
        assert all(torch.isfinite(v) for v in steps[0].values())
    assert losses[-1] < 0.7 * losses[0], losses
    after = experience_values(module.critic, exp, 4)
    assert not torch.allclose(after, before)


def test_single_forward_update_equals_two_forwards(tmp_path, monkeypatch) -> None:
    """One step on one micro-batch of the whole batch: the experience phase's forward (graph
    kept) serves as log π_old and as the update's forward; the update equals the one that runs a
    second forward."""
    from copy import deepcopy
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from rpp_lightning.rl.policy import experience_log_probs, response_log_probs
    from rpp_lightning.rl.update import single_forward_update
    from rpp_lightning.tiny import tiny_llama_config

    module = _module(tmp_path, monkeypatch, "reinforce_pp_baseline")  # KL loss on top
    algorithm = replace(module.algorithm, mini_batch_size=4, micro_batch_size=4, entropy_coef=0.1)
    assert single_forward_update(algorithm, 4)
    assert not single_forward_update(replace(algorithm, micro_batch_size=2), 4)
    assert not single_forward_update(replace(algorithm, epochs=2), 4)
    assert not single_forward_update(algorithm, 8)
    config = PolicyUpdateConfig(algorithm, module.estimator)
    torch.manual_seed(0)
    policies = [AutoModelForCausalLM.from_config(tiny_llama_config()) for _ in range(2)]
    policies[1].load_state_dict(policies[0].state_dict())
    initial = deepcopy(policies[0].state_dict())
    results = []
    for policy, fused in zip(policies, (False, True), strict=True):
        exp = _experience()
        if fused:
            forward = response_log_probs(
                policy, exp.sequences, exp.attention_mask, exp.num_actions, True
            )
            exp.old_log_probs = forward[0].detach()
        else:
            forward = None
            exp.old_log_probs, _ = experience_log_probs(policy, exp, 4)
        module.experience.advantages(exp, exp.rewards)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        steps = policy_update(
            policy, optimizer, exp, config, lambda loss: loss.backward(),
            torch.Generator().manual_seed(0), forward=forward,
        )  # fmt: skip
        results.append((deepcopy(policy.state_dict()), steps[0]))
    (plain, plain_stats), (fused, fused_stats) = results
    assert plain_stats.keys() == fused_stats.keys() and "entropy_bonus" in fused_stats
    for key, value in plain_stats.items():
        torch.testing.assert_close(fused_stats[key], value, atol=1e-6, rtol=1e-5, msg=key)
    moved = max((plain[k] - initial[k]).abs().max() for k in plain)
    assert moved > 1e-3, "the update did not move the weights: the comparison would be vacuous"
    for name, weight in plain.items():
        torch.testing.assert_close(fused[name], weight, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="one optimizer step on one micro-batch"):
        policy_update(
            policies[0], optimizer, _experience(), PolicyUpdateConfig(
                replace(algorithm, micro_batch_size=2), module.estimator
            ), lambda loss: loss.backward(), torch.Generator(), forward=forward,
        )  # fmt: skip


def test_experience_of_a_batch_and_a_failed_reward_call() -> None:
    """ExperienceMaker alone, on a hand-made rollout batch: log-probs, rewards and advantages;
    a reward call that failed stops the iteration (on every rank alike) before any of it is
    used, and leaves the running reward statistics untouched."""
    from concurrent.futures import Future

    from transformers import AutoModelForCausalLM

    from rpp_lightning.algorithms import get_estimator
    from rpp_lightning.clients.generation import Rollout
    from rpp_lightning.clients.rewards import RewardBatch, RewardError
    from rpp_lightning.config import AlgorithmConfig
    from rpp_lightning.rl.experience import RolloutBatch
    from rpp_lightning.rl.experience_maker import ExperienceMaker
    from rpp_lightning.rl.faults import ServerFailure
    from rpp_lightning.rl.models import Models
    from rpp_lightning.tiny import tiny_llama_config

    maker = ExperienceMaker(
        RolloutConfig(n_samples=2), AlgorithmConfig(), get_estimator("reinforce_pp")
    )
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(tiny_llama_config())
    exp = _experience()
    packed = Experience(exp.sequences, exp.attention_mask, exp.action_mask, torch.zeros(4))
    lengths = exp.action_mask.sum(1).tolist()
    rollouts = [
        Rollout(i // 2, i % 2, [1] * n, [0.0] * n, "stop", 3) for i, n in enumerate(lengths)
    ]
    scored = Future()
    scored.set_result(RewardBatch([1.0, 0.0, 0.5, 0.25], {}, [None] * 4, [{}] * 4))
    timings: dict[str, float] = {}
    models = Models(policy, 3, reference=policy)  # the same weights: KL 0, but computed
    made = maker.make(RolloutBatch(rollouts, packed, scored, {}), models, timings)
    assert made.exp.old_log_probs.shape == exp.action_mask.shape and made.exp.advantages is not None
    assert made.exp.rewards.tolist() == [1.0, 0.0, 0.5, 0.25]  # no normalisation configured
    assert {"logprobs", "score_wait"} <= timings.keys()
    failed = Future()
    failed.set_exception(RewardError("math: non-finite reward (nan) for sample 0"))
    before = maker.running_reward.state_dict()
    with pytest.raises(ServerFailure, match=r"scoring failed: RewardError: math: non-finite"):
        maker.make(RolloutBatch(rollouts, packed, failed, {}), Models(policy, 3), {})
    assert maker.running_reward.state_dict() == before


class _FakeGeneration:
    """Records the pushes; with `reaches_none`, no replica takes them."""

    def __init__(self) -> None:
        self.pushed: list[int] = []
        self.reaches_none = False

    def push_weights(self, state, version: int, dtype=None) -> None:
        if self.reaches_none:
            raise RuntimeError(f"weights version {version} reached no replica")
        self.pushed.append(version)


def test_weight_sync_numbers_its_pushes_and_survives_one_no_replica_took(caplog) -> None:
    """WeightSync alone, with servers that serve version 5 when it starts."""
    from types import SimpleNamespace

    from rpp_lightning.rl.distributed import SingleProcess
    from rpp_lightning.rl.faults import WeightPushError
    from rpp_lightning.rl.weight_sync import WeightSync

    generation = _FakeGeneration()
    servers = SimpleNamespace(
        generation=generation, served_version=lambda: 5, push_dtype=lambda device: torch.float32
    )
    model = torch.nn.Linear(2, 2)
    sync = WeightSync(servers, max_staleness=1)
    with pytest.raises(RuntimeError, match="connect"):
        sync.push(model)  # the ranks are not known yet
    sync.connect(SingleProcess())
    sync.ensure_synced(model)
    sync.ensure_synced(model)  # once: after it, the servers serve what was pushed
    assert generation.pushed == [6] and sync.version == 6  # after what they served
    sync.keep_before_update(model)  # the weights of version 6
    sync.push_after_update(model)
    sync.keep_before_update(model)  # of version 7
    sync.push_after_update(model)
    sync.forget_out_of_reach()  # at 8 with max_staleness 1: only 7 may still be needed
    assert generation.pushed == [6, 7, 8] and len(sync.snapshots) == 1
    assert sync.snapshots.label_of(7, 8) == 7
    generation.reaches_none = True
    with caplog.at_level(logging.WARNING, logger="rpp.faults"):
        sync.push_after_update(model)  # the run goes on; the version too: 8 is not the policy
    assert sync.version == 9 and "the next iteration pushes again" in caplog.text
    assert sync.push_again(model) == 10
    with pytest.raises(WeightPushError, match="weight push of version 11 failed"):
        sync.push(model)
    generation.reaches_none = False
    sync.restore(3)  # a checkpoint: whatever the servers serve now, push before use
    sync.ensure_synced(model)
    assert sync.version == 6 and generation.pushed[-1] == 6  # max(3, served 5) + 1


def test_sampler_shards_match_one_process_and_resume() -> None:
    single = list(ResumableSampler(40, batch_size=4, rank=0, world_size=1, seed=3))
    ranks = [list(ResumableSampler(40, 2, rank, 2, seed=3)) for rank in range(2)]
    for step in range(10):  # step t of 2 ranks × 2 prompts == step t of one process × 4
        union = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
        assert union == single[4 * step : 4 * step + 4]
    resumed = list(ResumableSampler(40, 4, 0, 1, seed=3, skip_batches=lambda: 3))
    assert resumed == single[12:]
    assert len(set(single)) == 40
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ResumableSampler(3, 2, 0, 2, seed=0)


@pytest.fixture
def prompt_files(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 2} for i in range(6)]
    rows.append({"prompt": "x" * 300, "answer": "0", "level": 0})  # too long
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    hf_dir = tmp_path / "hf"
    Dataset.from_list(rows).save_to_disk(str(hf_dir))
    return rows, [jsonl, parquet, hf_dir]


def test_missing_model_directory_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the config's relative tokenizer path no longer resolves
    with pytest.raises(ValueError, match="tokenizer: no such directory 'assets/char_tokenizer'"):
        cli_main(["--config", str(ROOT / "configs" / "tiny.yaml")], run=False)


def test_jsonl_parquet_and_hf_directory_read_the_same_rows(prompt_files) -> None:
    rows, paths = prompt_files
    for path in paths:
        assert read_rows(path) == rows, path
    with pytest.raises(FileNotFoundError):
        read_rows(paths[0].with_name("missing.jsonl"))


def test_prompt_data_module_templates_filters_and_holds_out(prompt_files) -> None:
    _, paths = prompt_files
    tokenizer = TOKENIZER
    data = PromptDataModule(str(paths[0]), val_size=2, tokenizer=tokenizer, max_prompt_tokens=64)
    data.setup("fit")
    assert len(data.train_rows) + len(data.val_rows) == 6  # the 300-character prompt is dropped
    assert len(data.val_rows) == 2
    train_prompts = {r.prompt for r in data.train_rows}
    assert not train_prompts & {r.prompt for r in data.val_rows}
    row = data.train_rows[0]
    assert row.prompt.startswith("user: What is ") and row.prompt.endswith("assistant: ")
    assert len(row.prompt_ids) == len(row.prompt)  # one id per character
    assert row.metadata["level"] in {"0", "1"} and row.reference
    strict = PromptDataModule(str(paths[0]), tokenizer=tokenizer, max_prompt_tokens=64,
                              too_long="error")  # fmt: skip
    with pytest.raises(ValueError, match="longer than max_prompt_tokens=64"):
        strict.setup("fit")
    wrong = PromptDataModule(str(paths[0]), tokenizer=tokenizer, prompt_column="question")
    with pytest.raises(ValueError, match="no column 'question'"):
        wrong.setup("fit")


@pytest.fixture
def reward_servers_running():
    """Two replicas of a graded verifier and one math-verify server, in-process, on loopback."""
    from trainer_verifiers import DigitShareVerifier

    from reward_servers.math_verifier import MathVerifier
    from reward_servers.servicer import RewardServicer

    digits = [DigitShareVerifier() for _ in range(2)]
    servicers = [RewardServicer(v) for v in [*digits, MathVerifier(workers=1)]]
    servers = [GrpcServer(ServerConfig(), [s.spec()]) for s in servicers]
    for server in servers:
        server.start()
    yield [f"127.0.0.1:{s.port}" for s in servers], digits
    for server in servers:
        server.stop(grace=0)


def test_reward_routing_weights_and_round_robin(reward_servers_running) -> None:
    addresses, digit_verifiers = reward_servers_running
    client = RewardClient(
        [
            RewardSource(name="digits", addresses=addresses[:2], weight=0.5),
            RewardSource(
                name="math", addresses=addresses[2:], weight=2.0,
                route_column="task", route_values=["math"],
            ),
        ]
    )  # fmt: skip
    queries = [
        RewardQuery("q", "so \\boxed{12}", "12", {"task": "math"}),
        RewardQuery("q", "ab12", "", {"task": "chat"}),
        RewardQuery("q", "\\boxed{7}", "8", {"task": "math"}),
    ]
    batch = client.score(queries)
    digits = [2 / 13, 2 / 4, 1 / 9]  # share of digit characters per response
    assert batch.per_source["digits"] == pytest.approx(digits)
    assert batch.per_source["math"] == [1.0, None, 0.0]
    assert batch.total == pytest.approx([0.5 * digits[0] + 2.0, 0.5 * digits[1], 0.5 * digits[2]])
    assert batch.correct[0] is True and batch.correct[2] is False
    # several addresses for one source: gRPC round_robin spreads calls over both replicas
    for _ in range(6):
        client.score(queries[1:2])
    calls = [v.calls for v in digit_verifiers]
    assert all(c > 0 for c in calls), calls
    client.close()


def test_unrouted_sample_is_a_clear_error(reward_servers_running) -> None:
    addresses, _ = reward_servers_running
    source = RewardSource(name="math", addresses=addresses[2:], route_column="task",
                          route_values=["math"])  # fmt: skip
    client = RewardClient([source])
    with pytest.raises(ValueError, match="match no reward source"):
        client.score([RewardQuery("q", "hi", "", {"task": "chat"})])
    client.close()
