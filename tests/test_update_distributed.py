"""Cross-rank parts of the update on 2 gloo processes: the equal-work check, metric reduction."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from two_ranks import run_on_two_ranks

from rpp_lightning.rl.metrics import reduce_metrics
from rpp_lightning.rl.update import check_same_rows_on_every_rank


def _worker(rank: int, out_dir: str) -> None:
    group, device = dist.group.WORLD, torch.device("cpu")
    result = {}
    check_same_rows_on_every_rank(8, group, device)  # equal: passes on both ranks
    try:
        check_same_rows_on_every_rank(8 if rank == 0 else 6, group, device)
        result["unequal"] = "passed"
    except RuntimeError as exc:
        result["unequal"] = str(exc)
    # accuracy undefined on rank 1 (no verifier verdicts), a per-source reward on both
    metrics = {
        "reward": [0.5, 1.5][rank],
        "accuracy": [0.25, None][rank],
        "response_length/max": [7.0, 12.0][rank],
        "weights_version/rollouts": [24.0, 23.0][rank],  # a push landed between two ranks
        "reward/chat": None,
    }
    result["reduced"] = reduce_metrics(metrics, group, device)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.mark.timeout(120)
def test_unequal_work_is_refused_and_metrics_reduce_over_ranks(tmp_path) -> None:
    run_on_two_ranks(_worker, str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "different rollout batch sizes (max 8, min 6" in result["unequal"]
        # means over the ranks where a metric is defined, maxima for /max, the oldest weights
        # version of any rank's rollouts, undefined dropped
        assert result["reduced"] == {
            "reward": 1.0,
            "accuracy": 0.25,
            "response_length/max": 12.0,
            "weights_version/rollouts": 23.0,
        }


UPDATE_METRICS = ("policy_loss", "clip_fraction", "approx_kl", "ratio", "kl_loss", "entropy_bonus")


def _update_config(mini_batch_size: int):
    from rpp_lightning.algorithms import get_estimator
    from rpp_lightning.config import AlgorithmConfig
    from rpp_lightning.rl.update import PolicyUpdateConfig

    # reinforce_pp_baseline puts KL in the loss (k2): kl_loss is logged; entropy_coef: the bonus
    algorithm = AlgorithmConfig(
        advantage_estimator="reinforce_pp_baseline", kl_coef=0.1, entropy_coef=0.01,
        mini_batch_size=mini_batch_size, micro_batch_size=2,
    )  # fmt: skip
    return PolicyUpdateConfig(algorithm, get_estimator("reinforce_pp_baseline"))


def _update_stats(model, exp, mini_batch_size: int, group=None) -> dict[str, float]:
    """An update's logged statistics, reduced over ranks as the trainer logs them."""
    from rpp_lightning.rl.metrics import update_metrics
    from rpp_lightning.rl.update import policy_update

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = policy_update(
        model, optimizer, exp, _update_config(mini_batch_size), lambda loss: loss.backward(),
        torch.Generator().manual_seed(0), group,
    )  # fmt: skip
    return reduce_metrics(update_metrics(steps), group, torch.device("cpu"))


def _stats_worker(rank: int, model_dir: str, exp_path: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from rpp_lightning.config import PolicyConfig
    from rpp_lightning.rl.policy import load_sharded_causal_lm

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    model = load_sharded_causal_lm(PolicyConfig(path=model_dir), mesh, torch.device("cpu"))
    exp = torch.load(exp_path, weights_only=False)
    mine = exp.select(torch.arange(4 * rank, 4 * rank + 4))  # rank r: rows [4r, 4r + 4)
    stats = _update_stats(model, mine, 4, dist.group.WORLD)
    with open(f"{out_dir}/stats{rank}.json", "w") as f:
        json.dump(stats, f)


def _off_policy_batch(model):
    """8 rollouts with log π_old a little off the model's, so ratios, clips and KL are not 0."""
    from rpp_lightning.rl.experience import Experience, pack_rollouts
    from rpp_lightning.rl.policy import response_log_probs

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (n,), generator=gen).tolist() for n in (3, 5, 2, 4)]
    responses = [torch.randint(3, 100, (n,), generator=gen).tolist() for n in (4, 1, 6, 3) * 2]
    sequences, attention, actions = pack_rollouts(prompts, responses, 2, pad_token_id=0)
    exp = Experience(sequences, attention, actions, torch.zeros(8))
    with torch.no_grad():
        log_probs, _ = response_log_probs(model, sequences, attention, exp.num_actions)
    exp.old_log_probs = log_probs + 0.3 * torch.randn(log_probs.shape, generator=gen)
    exp.ref_log_probs = log_probs + 0.3 * torch.randn(log_probs.shape, generator=gen)
    exp.advantages = torch.randn(log_probs.shape, generator=gen) * actions
    return exp


@pytest.mark.timeout(180)
def test_logged_update_metrics_on_two_ranks_equal_one_process(tmp_path) -> None:
    """Each rank's loss statistics are its share of a global token mean: summed over ranks, not
    averaged (averaged, 2 ranks logged half the value: ratio 0.507 for 1.015)."""
    from transformers import AutoModelForCausalLM

    from rpp_lightning.tiny import tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    model.save_pretrained(tmp_path / "model")
    exp = _off_policy_batch(model)
    torch.save(exp, tmp_path / "exp.pt")
    run_on_two_ranks(
        _stats_worker, str(tmp_path / "model"), str(tmp_path / "exp.pt"), str(tmp_path)
    )
    single = _update_stats(model, exp, 8)  # the same 8 rows as one mini-batch, one process
    assert single["ratio"] == pytest.approx(1.0, abs=0.3) and single["clip_fraction"] > 0
    for rank in range(2):
        sharded = json.loads((tmp_path / f"stats{rank}.json").read_text())
        for key in (*UPDATE_METRICS, "grad_norm"):
            assert sharded[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
