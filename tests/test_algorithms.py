"""Hand-computed checks of rpp_lightning.algorithms against docs/algorithm.md §1–§5.

Expected numbers are worked out in the comments next to them, never by calling the code under test.
"""

import math

import pytest
import torch

from rpp_lightning.algorithms import (
    ADVANTAGE_ESTIMATORS,
    RunningMeanStd,
    clip_rewards,
    compute_advantages,
    discounted_returns,
    entropy_from_logits,
    gae,
    get_estimator,
    group_mean_baseline,
    group_normalized,
    kl_estimate,
    kl_loss,
    leave_one_out_baseline,
    log_probs_from_logits,
    masked_global_mean_var,
    masked_mean,
    masked_sum,
    masked_token_mean,
    masked_whiten,
    normalize_rewards,
    policy_loss,
    shape_token_rewards,
    value_loss,
)
from rpp_lightning.algorithms import losses as losses_module

T_ = torch.tensor


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual.double(), T_(expected, dtype=torch.float64), atol=atol, rtol=0
    )


# --- §1 KL estimators -------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    log_probs = T_([[0.0, -1.0, -2.0]])
    ref = T_([[0.0, -2.0, -1.0]])  # r = [0, 1, -1]
    close(kl_estimate(log_probs, ref, "k1"), [[0.0, 1.0, -1.0]])
    close(kl_estimate(log_probs, ref, "k2"), [[0.0, 0.5, 0.5]])  # r²/2
    # k3 = e^{-r} − 1 + r: r=1 → e^{-1} = 0.367879; r=−1 → e − 2 = 0.718282
    close(kl_estimate(log_probs, ref, "k3"), [[0.0, 0.367879, 0.718282]])


def test_kl_clamp_and_no_overflow():
    log_probs = T_([[30.0, -30.0, -200.0]])
    ref = torch.zeros(1, 3)
    close(kl_estimate(log_probs, ref, "k1"), [[10.0, -10.0, -10.0]])
    close(kl_estimate(log_probs, ref, "k2"), [[10.0, 10.0, 10.0]])  # 450 → 10
    close(kl_estimate(log_probs, ref, "k3"), [[10.0, 10.0, 10.0]])  # e^{200} would be inf
    close(kl_estimate(log_probs, ref, "k1", clamp=5.0), [[5.0, -5.0, -5.0]])


def test_kl_is_differentiable_and_rejects_unknown():
    log_probs = T_([[2.0, 0.5]], requires_grad=True)
    kl_estimate(log_probs, torch.zeros(1, 2), "k2").sum().backward()
    close(log_probs.grad, [[2.0, 0.5]])  # d(r²/2)/dr = r
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(log_probs, log_probs, "k4")


# --- masked statistics and whitening -----------------------------------------------------------

X = T_([[1.0, 2.0, float("nan")], [3.0, 4.0, 100.0]])
M = T_([[1, 1, 0], [1, 1, 0]])  # selects 1, 2, 3, 4: mean 2.5, population var 1.25


def test_masked_sum_and_mean_ignore_garbage_and_empty_rows():
    mask = T_([[1, 1, 0], [0, 0, 0]])
    close(masked_sum(X, mask), 3.0)
    close(masked_sum(X, mask, dim=1), [3.0, 0.0])
    close(masked_mean(X, mask), 1.5)
    close(masked_mean(X, mask, dim=1), [1.5, 0.0])  # empty row → 0, not NaN
    close(masked_mean(X, torch.zeros(2, 3)), 0.0)


def test_masked_global_mean_var_local():
    mean, var = masked_global_mean_var(X, M)
    close(mean, 2.5)
    close(var, 1.25)  # ((1.5² + 0.5²) · 2) / 4


def test_masked_whiten_hand_values():
    # (x − 2.5) / sqrt(1.25): ±1.5 → ±1.341641, ±0.5 → ±0.447214
    close(masked_whiten(X, M), [[-1.341641, -0.447214, 0.0], [0.447214, 1.341641, 0.0]])
    # shift_mean=False adds μ = 2.5 back
    close(
        masked_whiten(X, M, shift_mean=False),
        [[1.158359, 2.052786, 0.0], [2.947214, 3.841641, 0.0]],
    )


def test_masked_whiten_constant_and_empty():
    same = torch.full((2, 3), 5.0)
    close(masked_whiten(same, M), [[0.0] * 3] * 2)  # σ² = 0 → eps keeps it finite: 0 / 1e-4
    close(masked_whiten(X, torch.zeros(2, 3)), [[0.0] * 3] * 2)


def test_running_mean_std_merge_equals_concatenation():
    rms = RunningMeanStd()
    close(rms.normalize(T_([3.0])), [3.0])  # identity before any update
    rms.update(T_([1.0, 2.0, 3.0]))
    assert rms.mean == pytest.approx(2.0) and rms.var == pytest.approx(2 / 3)
    rms.update(T_([4.0, 5.0]))
    rms.update(torch.empty(0))  # no-op
    # stats of [1, 2, 3, 4, 5]: mean 3, population var (4 + 1 + 0 + 1 + 4) / 5 = 2
    assert rms.count == 5
    assert rms.mean == pytest.approx(3.0) and rms.var == pytest.approx(2.0)
    assert rms.std == pytest.approx(math.sqrt(2.0))
    close(rms.normalize(T_([3.0, 5.0])), [0.0, 1.414214])  # 2 / sqrt(2)
    restored = RunningMeanStd()
    restored.load_state_dict(rms.state_dict())
    assert restored.state_dict() == rms.state_dict()


def test_clip_rewards():
    close(clip_rewards(T_([-20.0, -1.0, 0.5, 15.0]), 10.0), [-10.0, -1.0, 0.5, 10.0])
    with pytest.raises(ValueError, match="reward clip must be > 0"):
        clip_rewards(T_([1.0]), 0.0)


def test_normalize_rewards_modes():
    rewards = T_([1.0, 2.0, 3.0, 4.0])
    assert normalize_rewards(rewards, "none") is rewards
    close(normalize_rewards(rewards, "batch"), [-1.341641, -0.447214, 0.447214, 1.341641])
    rms = RunningMeanStd()
    # [1, 2, 3]: mean 2, var 2/3, std 0.816497 → ±1 / 0.816497 = ±1.224745
    close(normalize_rewards(T_([1.0, 2.0, 3.0]), "running", rms), [-1.224745, 0.0, 1.224745])
    assert rms.count == 3
    with pytest.raises(ValueError, match="needs a RunningMeanStd"):
        normalize_rewards(rewards, "running")
    with pytest.raises(ValueError, match="unknown reward normalisation"):
        normalize_rewards(rewards, "median")


# --- §4 group baselines ------------------------------------------------------------------------


def test_group_baselines_hand_values():
    # groups [1, 2] and [3, 6]: means 1.5 and 4.5
    close(group_mean_baseline(T_([1.0, 2.0, 3.0, 6.0]), 2), [-0.5, 0.5, -1.5, 1.5])
    # [0, 1, 5]: mean 2, centred [−2, −1, 3], unbiased var 14/2 = 7, std 2.645751
    close(group_normalized(T_([0.0, 1.0, 5.0]), 3), [-0.755929, -0.377964, 1.133893])
    close(group_normalized(T_([2.0, 2.0, 2.0]), 3), [0.0, 0.0, 0.0])  # equal rewards: 0, not NaN
    # others' means: (1+5)/2 = 3, (0+5)/2 = 2.5, (0+1)/2 = 0.5
    close(leave_one_out_baseline(T_([0.0, 1.0, 5.0]), 3), [-3.0, -1.5, 4.5])


@pytest.mark.parametrize("fn", [group_mean_baseline, group_normalized, leave_one_out_baseline])
def test_group_baselines_reject_bad_groups(fn):
    with pytest.raises(ValueError, match=r"needs n_samples_per_prompt >= 2.*got n_samples"):
        fn(T_([1.0, 2.0]), 1)
    with pytest.raises(
        ValueError, match="batch size 5 is not a multiple of n_samples_per_prompt=2"
    ):
        fn(torch.ones(5), 2)


# --- §2 shaping and §3 returns -----------------------------------------------------------------

SHAPE_MASK = T_([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])  # full, tool token inside, empty
SHAPE_KL = T_([[0.1, 0.2, 0.3, 9.0], [0.4, 9.0, 0.2, 9.0], [5.0, 5.0, 5.0, 5.0]])


def test_shape_token_rewards_hand_values():
    rewards = T_([1.0, 2.0, 3.0])
    # −0.5·kl on action tokens, + R on the last one: 0.85 = −0.15 + 1, 1.9 = −0.1 + 2
    close(
        shape_token_rewards(rewards, SHAPE_KL, SHAPE_MASK, 0.5),
        [[-0.05, -0.1, 0.85, 0.0], [-0.2, 0.0, 1.9, 0.0], [0.0, 0.0, 0.0, 0.0]],
    )
    close(
        shape_token_rewards(rewards, None, SHAPE_MASK, 0.5),
        [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    )
    close(shape_token_rewards(T_([4.0]), None, T_([[1, 0, 0]]), 0.0), [[4.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        shape_token_rewards(rewards, SHAPE_KL, SHAPE_MASK, -0.1)


def test_discounted_returns_gamma_one_not_reset_at_masked_token():
    token_rewards = T_([[-0.05, -0.1, 0.85, 7.0], [-0.2, 100.0, 1.9, 7.0], [3.0, 3.0, 3.0, 3.0]])
    # row 0: suffix sums 0.7, 0.75, 0.85; row 1: −0.2 + 0 (masked) + 1.9 = 1.7, not −0.2
    close(
        discounted_returns(token_rewards, SHAPE_MASK, 1.0),
        [[0.7, 0.75, 0.85, 0.0], [1.7, 0.0, 1.9, 0.0], [0.0, 0.0, 0.0, 0.0]],
    )


def test_discounted_returns_gamma_half():
    # G2 = 4, G1 = 2 + 0.5·4 = 4, G0 = 1 + 0.5·4 = 3
    close(discounted_returns(T_([[1.0, 2.0, 4.0]]), torch.ones(1, 3), 0.5), [[3.0, 4.0, 4.0]])
    # masked middle token: reward 0 but still one discount step: G0 = 1 + 0.5·(0 + 0.5·4) = 2
    close(discounted_returns(T_([[1.0, 9.0, 4.0]]), T_([[1, 0, 1]]), 0.5), [[2.0, 0.0, 4.0]])
    with pytest.raises(ValueError, match="gamma must be in"):
        discounted_returns(T_([[1.0]]), T_([[1]]), 1.5)


def test_gae_three_steps_by_hand():
    rewards = T_([[0.0, 0.0, 1.0], [2.0, 5.0, 5.0]])
    values = T_([[0.5, 0.6, 0.7], [0.5, 9.0, 9.0]])
    mask = T_([[1, 1, 1], [1, 0, 0]])  # second row: a one-token response
    # γ = 0.9, λ = 0.8 (γλ = 0.72):
    # δ2 = 1 − 0.7 = 0.3; δ1 = 0.9·0.7 − 0.6 = 0.03; δ0 = 0.9·0.6 − 0.5 = 0.04
    # A2 = 0.3; A1 = 0.03 + 0.72·0.3 = 0.246; A0 = 0.04 + 0.72·0.246 = 0.21712
    # one-token row: δ0 = 2 + 0 − 0.5 = 1.5
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[0.21712, 0.246, 0.3], [1.5, 0.0, 0.0]])
    close(returns, [[0.71712, 0.846, 1.0], [2.0, 0.0, 0.0]])  # A + V
    # λ = γ = 1: A_t = G_t − V_t = 1 − V_t
    advantages, _ = gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.4, 0.3]])
    with pytest.raises(ValueError, match="lam must be in"):
        gae(rewards, values, mask, gamma=1.0, lam=-0.1)


# --- §4 registry and compute_advantages --------------------------------------------------------


def test_registry_matches_table():
    table = {
        # name: (kl_in_reward, kl_loss_estimator, global_normalization, needs_values, min n)
        "reinforce_pp": (True, None, True, False, 1),
        "reinforce_pp_baseline": (False, "k2", True, False, 2),
        "grpo": (False, "k3", False, False, 2),
        "rloo": (True, None, False, False, 2),
        "ppo": (True, None, True, True, 1),
    }
    assert set(ADVANTAGE_ESTIMATORS) == set(table)
    for name, row in table.items():
        s = get_estimator(name)
        got = (
            s.kl_in_reward,
            s.kl_loss_estimator,
            s.global_normalization,
            s.needs_values,
            s.min_samples_per_prompt,
        )
        assert got == row, name
    assert get_estimator("grpo").scalar_baseline is group_normalized
    with pytest.raises(ValueError, match="unknown advantage estimator 'gpro'; valid: reinforce_pp"):
        get_estimator("gpro")


def test_reinforce_pp_hand_values_and_whitening():
    rewards = T_([1.0, 3.0], requires_grad=True)
    mask = T_([[1, 1], [1, 0]])
    # kl_coef 0: token rewards [[0, 1], [3, 0]] → returns [[1, 1], [3, 0]]
    # over 1, 1, 3: μ = 5/3, σ² = 8/9, σ = 0.942809 → A = −0.707107, 1.414214
    out = compute_advantages(
        "reinforce_pp", rewards, None, mask, n_samples_per_prompt=1, kl_coef=0.0
    )
    close(out.returns, [[1.0, 1.0], [3.0, 0.0]])
    close(out.advantages, [[-0.707107, -0.707107], [1.414214, 0.0]])
    assert out.stats["advantage_mean"] == pytest.approx(5 / 3)
    assert out.stats["advantage_std"] == pytest.approx(0.942809, abs=1e-6)
    assert not out.advantages.requires_grad and not out.returns.requires_grad

    # KL in the reward: token rewards [[−0.1, 1 − 0.2], [3 − 0.5, ·]] → returns 0.7, 0.8, 2.5
    kl = T_([[0.2, 0.4], [1.0, 7.0]])
    out = compute_advantages("reinforce_pp", rewards, kl, mask, n_samples_per_prompt=1, kl_coef=0.5)
    close(out.returns, [[0.7, 0.8], [2.5, 0.0]])
    with pytest.raises(ValueError, match="shapes KL into the reward: pass kl"):
        compute_advantages("reinforce_pp", rewards, None, mask, n_samples_per_prompt=1, kl_coef=0.5)


def test_reinforce_pp_global_stats_with_edge_rows():
    rewards = T_([1.0, -2.0, 0.5, 4.0, 3.0])
    mask = T_(
        [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]
    )  # full, tool token inside, empty, one-token, shorter
    kl = torch.linspace(-1.0, 1.0, 20).view(5, 4)
    out = compute_advantages("reinforce_pp", rewards, kl, mask, n_samples_per_prompt=1, kl_coef=0.1)
    a = out.advantages
    assert torch.isfinite(a).all() and torch.isfinite(out.returns).all()
    assert (a[mask == 0] == 0).all()  # incl. the all-masked row
    values = a[mask == 1]
    assert values.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert values.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_reinforce_pp_baseline_ignores_kl_and_whitens():
    rewards = T_([1.0, 3.0, 0.0, 0.0])
    mask = T_([[1, 1], [1, 0], [1, 1], [0, 0]])
    kl = torch.full((4, 2), 2.0)  # must not enter the reward
    out = compute_advantages(
        "reinforce_pp_baseline", rewards, kl, mask, n_samples_per_prompt=2, kl_coef=0.5
    )
    close(out.scalar_rewards_after_baseline, [-1.0, 1.0, 0.0, 0.0])  # group means 2, 0
    close(out.returns, [[-1.0, -1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    # over −1, −1, 1, 0, 0: μ = −0.2, σ² = (0.64·2 + 1.44 + 0.04·2) / 5 = 0.56, σ = 0.748331
    # −0.8/σ = −1.069045, 1.2/σ = 1.603567, 0.2/σ = 0.267261
    close(
        out.advantages,
        [[-1.069045, -1.069045], [1.603567, 0.0], [0.267261, 0.267261], [0.0, 0.0]],
    )


def test_grpo_group_normalised_and_not_renormalised():
    rewards = T_([1.0, 1.0, 1.0, 0.0, 1.0, 5.0])
    mask = T_([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]])
    kl = torch.full((6, 3), 3.0)  # KL is a k3 loss for grpo, never in the reward
    out = compute_advantages("grpo", rewards, kl, mask, n_samples_per_prompt=3, kl_coef=0.5)
    # group 1 all equal → 0 (not NaN); group 2 → [−0.755929, −0.377964, 1.133893] on every token
    close(
        out.advantages,
        [
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [-0.755929, -0.755929, -0.755929],
            [-0.377964, -0.377964, -0.377964],
            [1.133893, 1.133893, 0.0],
        ],
    )
    with pytest.raises(ValueError, match=r"'grpo' uses a per-prompt group baseline.*got 1"):
        compute_advantages("grpo", rewards, kl, mask, n_samples_per_prompt=1, kl_coef=0.0)
    with pytest.raises(ValueError, match="not a multiple of n_samples_per_prompt=4"):
        compute_advantages("grpo", rewards, kl, mask, n_samples_per_prompt=4, kl_coef=0.0)


def test_rloo_kl_in_reward_not_normalised():
    rewards = T_([0.0, 1.0, 5.0])
    kl = torch.ones(3, 2)
    out = compute_advantages(
        "rloo", rewards, kl, torch.ones(3, 2), n_samples_per_prompt=3, kl_coef=0.1
    )
    # baselines [−3, −1.5, 4.5]; token rewards [−0.1, R − 0.1] → returns [R − 0.2, R − 0.1]
    close(out.scalar_rewards_after_baseline, [-3.0, -1.5, 4.5])
    close(out.advantages, [[-3.2, -3.1], [-1.7, -1.6], [4.3, 4.4]])


def test_ppo_gae_and_value_checks():
    mask = torch.ones(1, 3)
    values = T_([[0.5, 0.6, 0.7]])
    out = compute_advantages(
        "ppo", T_([1.0]), None, mask, n_samples_per_prompt=1, kl_coef=0.0,
        gamma=0.9, lam=0.8, values=values,
    )  # fmt: skip
    close(out.returns, [[0.71712, 0.846, 1.0]])  # the 3-step GAE example above
    # whitened [0.21712, 0.246, 0.3]: μ = 0.254373, σ² = 0.00117991 → −1.084530, −0.243767, 1.328297
    close(out.advantages, [[-1.084530, -0.243767, 1.328297]], atol=1e-4)
    with pytest.raises(ValueError, match="'ppo' \\(GAE\\) needs critic values"):
        compute_advantages("ppo", T_([1.0]), None, mask, n_samples_per_prompt=1, kl_coef=0.0)
    with pytest.raises(ValueError, match="has no critic"):
        compute_advantages(
            "rloo", T_([1.0, 2.0]), None, torch.ones(2, 3), n_samples_per_prompt=2,
            kl_coef=0.0, values=torch.ones(2, 3),
        )  # fmt: skip
    with pytest.raises(ValueError, match="unknown advantage estimator 'reinforce'"):
        compute_advantages("reinforce", T_([1.0]), None, mask, n_samples_per_prompt=1, kl_coef=0.0)


def test_reward_clip_comes_before_the_group_baseline_by_default():
    # |R| > clip in the first group: R = [20, 0], clip 10.
    # clip then baseline (default): [10, 0] − 5 → [5, −5]; OpenRLHF's baseline then clip:
    # [20, 0] − 10 → [10, −10] → clip → [10, −10]. The second group is inside the clip: [1, −1].
    rewards, mask = T_([20.0, 0.0, 3.0, 1.0]), torch.ones(4, 2)
    common = dict(n_samples_per_prompt=2, kl_coef=0.0, reward_clip=10.0)

    def baselined(**kw):
        out = compute_advantages("reinforce_pp_baseline", rewards, None, mask, **common, **kw)
        return out.scalar_rewards_after_baseline

    close(baselined(), [5.0, -5.0, 1.0, -1.0])
    close(baselined(clip_order="clip_then_baseline"), [5.0, -5.0, 1.0, -1.0])
    close(baselined(clip_order="baseline_then_clip"), [10.0, -10.0, 1.0, -1.0])
    # without a baseline the order cannot matter: REINFORCE++ clips to [10, 0, 3, 1] either way
    for order in ("clip_then_baseline", "baseline_then_clip"):
        out = compute_advantages("reinforce_pp", rewards, None, mask, **common, clip_order=order)
        close(out.scalar_rewards_after_baseline, [10.0, 0.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="unknown clip_order"):
        compute_advantages("rloo", rewards, None, mask, **common, clip_order="later")


# --- §5 losses -----------------------------------------------------------------------------------


def test_masked_token_mean():
    x = T_([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = T_([[1, 1, 0], [1, 0, 0]])
    close(masked_token_mean(x, mask), 7.0 / 3.0)
    close(masked_token_mean(x, mask, num_action_tokens=7), 1.0)
    close(masked_token_mean(x, mask, num_action_tokens=T_(14)), 0.5)
    close(masked_token_mean(x, torch.zeros(2, 3)), 0.0)


def test_log_probs_and_entropy_from_logits(monkeypatch):
    # softmax(log[1, 2, 3] + 5) = [1, 2, 3] / 6
    logits = (torch.log(T_([1.0, 2.0, 3.0])) + 5.0).expand(2, 2, 3).contiguous()
    labels = T_([[0, 2], [1, 1]])
    expected = [[math.log(1 / 6), math.log(3 / 6)], [math.log(2 / 6), math.log(2 / 6)]]
    close(log_probs_from_logits(logits, labels), expected)
    # −Σ p log p = (ln 6)/6 + (ln 3)/3 + (ln 2)/2 = 1.011404
    close(entropy_from_logits(logits), [[1.011404] * 2] * 2)
    monkeypatch.setattr(losses_module, "_CHUNK_ELEMENTS", 4)  # one row per chunk: 4 chunks
    close(log_probs_from_logits(logits.bfloat16(), labels), expected, atol=2e-2)
    close(entropy_from_logits(logits), [[1.011404] * 2] * 2)
    with pytest.raises(ValueError, match="disagree on"):
        log_probs_from_logits(logits, labels[:, :1])


def test_entropy_with_masked_vocab_has_finite_grad():
    logits = T_([[[0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    close(entropy, [[math.log(2), math.log(3)]])
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


def _policy_case():
    # ratios 1.5, 0.5, 1.1, 1.0 against π_old = 1
    log_probs = torch.log(T_([[1.5, 0.5, 1.1, 1.0]])).requires_grad_()
    advantages = T_([[1.0, 1.0, -1.0, -2.0]], requires_grad=True)
    return log_probs, torch.zeros(1, 4), advantages, torch.ones(1, 4)


def test_policy_loss_hand_values_and_gradient():
    log_probs, old, advantages, mask = _policy_case()
    out = policy_loss(log_probs, old, advantages, mask)
    # L_t: −min(1.5, 1.2) = −1.2 (clipped); −min(0.5, 0.8) = −0.5; 1.1; 2 → mean 1.4/4
    close(out.loss, 0.35)
    close(out.clip_fraction, 0.25)
    close(out.ratio_mean, 1.025)  # 4.1 / 4
    # (ρ−1) − ln ρ: 0.094535 + 0.193147 + 0.004690 + 0 = 0.292372 → / 4
    close(out.approx_kl, 0.073093)
    out.loss.backward()
    # dL/dlog ρ_t = −A ρ / 4 where unclipped, 0 where clipped
    close(log_probs.grad, [[0.0, -0.125, 0.275, 0.5]])
    assert advantages.grad is None  # advantages are constants

    log_probs, old, advantages, mask = _policy_case()
    close(policy_loss(log_probs, old, advantages, mask, num_action_tokens=8).loss, 0.175)


def test_policy_loss_asymmetric_eps():
    log_probs = torch.log(T_([[1.25, 0.7]]))
    advantages = T_([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    # symmetric 0.2: −min(1.25, 1.2) = −1.2 (clipped); −min(−0.7, −0.8) = 0.8 (clipped)
    out = policy_loss(log_probs, torch.zeros(1, 2), advantages, mask)
    close(out.loss, (-1.2 + 0.8) / 2)
    close(out.clip_fraction, 1.0)
    # ε_low 0.35, ε_high 0.28: neither ratio reaches its bound → −1.25, 0.7
    out = policy_loss(
        log_probs, torch.zeros(1, 2), advantages, mask, clip_eps_low=0.35, clip_eps_high=0.28
    )
    close(out.loss, (-1.25 + 0.7) / 2)
    close(out.clip_fraction, 0.0)


def test_policy_loss_dual_clip_bounds_bad_tokens():
    log_probs = T_([[3.0, 3.0]], requires_grad=True)  # ρ = e³ = 20.085537
    advantages = T_([[-1.0, 1.0]])
    mask = torch.ones(1, 2)
    plain = policy_loss(log_probs, torch.zeros(1, 2), advantages, mask)
    close(plain.loss, (20.085537 - 1.2) / 2)
    out = policy_loss(log_probs, torch.zeros(1, 2), advantages, mask, dual_clip=3.0)
    close(out.loss, (3.0 - 1.2) / 2)  # A < 0 token bounded by −c·A = 3; A > 0 token untouched
    close(out.clip_fraction, 1.0)
    out.loss.backward()
    close(log_probs.grad, [[0.0, 0.0]])
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip must be > 1"):
            policy_loss(log_probs, torch.zeros(1, 2), advantages, mask, dual_clip=bad)


def test_policy_loss_large_log_ratio_stays_finite():
    log_probs = T_([[50.0, -50.0, float("-inf")]], requires_grad=True)
    advantages = T_([[-1.0, 1.0, float("nan")]])  # garbage under the mask must not leak
    mask = T_([[1, 1, 0]])
    out = policy_loss(log_probs, torch.zeros(1, 3), advantages, mask)
    # ρ clamps at e^20 = 4.851652e8 → L = 4.851652e8; second: −e^{−20} ≈ −2.1e−9
    assert out.loss.item() == pytest.approx(4.851652e8 / 2, rel=1e-5)
    out.loss.backward()
    assert torch.isfinite(log_probs.grad).all() and torch.isfinite(out.approx_kl)
    bounded = policy_loss(log_probs, torch.zeros(1, 3), advantages, mask, dual_clip=3.0)
    close(bounded.loss, 1.5, atol=1e-6)  # (3 − 2e−9) / 2


def test_kl_loss_values_and_gradient():
    log_probs = T_([[-1.0, -2.0, 0.0]], requires_grad=True)
    ref = T_([[-2.0, -1.0, float("nan")]])  # r = [1, −1, garbage under the mask]
    mask = T_([[1, 1, 0]])
    loss = kl_loss(log_probs, ref, mask, "k2")
    close(loss, 0.5)  # (0.5 + 0.5) / 2
    loss.backward()
    close(log_probs.grad, [[0.5, -0.5, 0.0]])  # r / 2
    close(kl_loss(log_probs, ref, mask, "k3"), (0.367879 + 0.718282) / 2)
    close(kl_loss(log_probs, ref, mask, "k2", num_action_tokens=4), 0.25)


def test_value_loss_clips_each_token_by_hand():
    # V, V_old, G per token (the 4th is padding with garbage), value_clip 0.2:
    #   t0: V − V_old = 0.3 → V_clip = 1.0; (1.1 − 1.5)² = 0.16 < (1.0 − 1.5)² = 0.25: clipped
    #   t1: V − V_old = −0.4 → V_clip = 0.7; (0.5 − 0)² = 0.25 < 0.49: clipped
    #   t2: V − V_old = 1.0 → V_clip = 1.2; (2.0 − 1.1)² = 0.81 > 0.01: unclipped
    # L = ½ · (0.25 + 0.49 + 0.81) / 3 = 0.258333; clip fraction 2/3
    values = T_([[1.1, 0.5, 2.0, 7.0]], requires_grad=True)
    old, returns = T_([[0.8, 0.9, 1.0, math.nan]]), T_([[1.5, 0.0, 1.1, math.inf]])
    mask = T_([[1, 1, 1, 0]])
    out = value_loss(values, old, returns, mask, value_clip=0.2)
    close(out.loss, 0.258333)
    close(out.clip_fraction, 2 / 3)
    out.loss.backward()
    # clipped tokens take V_clip, constant in V: no gradient; t2: ½ · 2 (V − G) / 3 = 0.3
    close(values.grad, [[0.0, 0.0, 0.3, 0.0]])
    # no clip: ½ · (0.16 + 0.25 + 0.81) / 3 = 0.203333; with 6 tokens as the denominator, half
    close(value_loss(values, old, returns, mask, value_clip=None).loss, 0.203333)
    unclipped = value_loss(values, old, returns, mask, value_clip=None, num_action_tokens=6)
    close(unclipped.loss, 0.101667)
    with pytest.raises(ValueError, match="value_clip must be > 0"):
        value_loss(values, old, returns, mask, value_clip=0.0)
