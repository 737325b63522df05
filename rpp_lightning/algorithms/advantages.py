"""Reward shaping, returns and advantages for every estimator (algorithm.md §2–§4).

Tensors are right-padded responses: (B, T) where T is the response dimension only and
``action_mask`` is 1 on action tokens. Rows are prompt-major: with n samples per prompt, rows
``[k*n, (k+1)*n)`` answer prompt k, so a group baseline must see whole groups (keep every group of
n on one rank; only the global whitening crosses ranks).

The one entry point is :func:`compute_advantages`; the table of §4 is :data:`ADVANTAGE_ESTIMATORS`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from rpp_lightning.algorithms.kl import KLEstimator
from rpp_lightning.algorithms.normalization import (
    apply_whitening,
    clip_rewards,
    masked_global_mean_var,
)

WHITEN_EPS = 1e-8  # algorithm.md §4: (A − μ) / sqrt(max(σ², 1e-8))
RewardClipOrder = Literal["clip_then_baseline", "baseline_then_clip"]


def _grouped(rewards: Tensor, n_samples_per_prompt: int, who: str) -> Tensor:
    """View (B,) rewards as (B / n, n) groups, or say clearly why that is impossible."""
    if rewards.dim() != 1:
        raise ValueError(f"{who}: rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    n = n_samples_per_prompt
    if n < 2:
        raise ValueError(
            f"{who} needs n_samples_per_prompt >= 2 (a group of one sample is its own baseline, "
            f"so every advantage would be 0), got n_samples_per_prompt={n}"
        )
    if rewards.numel() % n != 0:
        raise ValueError(
            f"{who}: batch size {rewards.numel()} is not a multiple of n_samples_per_prompt={n}; "
            "rows must be prompt-major groups of n samples"
        )
    return rewards.view(-1, n)  # (B/n, n)


def group_mean_baseline(rewards: Tensor, n_samples_per_prompt: int) -> Tensor:
    """``R_i − mean(group)``: the ``reinforce_pp_baseline`` scalar baseline (algorithm.md §4).

    rewards (B,) -> (B,)."""
    groups = _grouped(rewards, n_samples_per_prompt, "group_mean_baseline")  # (G, n)
    return (groups - groups.mean(dim=1, keepdim=True)).view(-1)


def group_normalized(rewards: Tensor, n_samples_per_prompt: int, eps: float = 1e-6) -> Tensor:
    """``(R_i − mean(group)) / (std(group) + eps)``: GRPO's baseline (algorithm.md §4).

    std is the unbiased sample std (``torch.std`` default, divisor n − 1), as OpenRLHF computes it.
    A group of equal rewards gives 0, not NaN. rewards (B,) -> (B,)."""
    groups = _grouped(rewards, n_samples_per_prompt, "group_normalized")  # (G, n)
    centered = groups - groups.mean(dim=1, keepdim=True)  # (G, n)
    return (centered / (groups.std(dim=1, keepdim=True) + eps)).view(-1)


def leave_one_out_baseline(rewards: Tensor, n_samples_per_prompt: int) -> Tensor:
    """``R_i − mean of the other n − 1 samples of its prompt``: RLOO (algorithm.md §4).

    rewards (B,) -> (B,)."""
    groups = _grouped(rewards, n_samples_per_prompt, "leave_one_out_baseline")  # (G, n)
    n = n_samples_per_prompt
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (n - 1)  # (G, n)
    return (groups - others_mean).view(-1)


def shape_token_rewards(
    rewards: Tensor, kl: Tensor | None, action_mask: Tensor, kl_coef: float
) -> Tensor:
    """Token-level rewards with a KL penalty (algorithm.md §2).

    Every action token gets ``−kl_coef · kl_t``; the last action token (highest index with mask 1)
    also gets ``+R_i``. ``kl=None`` gives the final reward only. Masked positions are 0, so a
    masked tool token inside a response contributes nothing, and an all-masked row is all 0 (it
    has no last action token to carry its reward).

    Args:
        rewards: (B,) scalar rewards (already clipped / baselined).
        kl: (B, T) per-token KL estimate, or None.
        action_mask: (B, T).
        kl_coef: β ≥ 0.
    Returns:
        (B, T) token rewards.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    mask = action_mask.bool()  # (B, T)
    T = mask.size(1)
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    # argmax returns the first maximum, so on the flipped mask it finds the last action token.
    last = T - 1 - mask.flip(1).long().argmax(dim=1)  # (B,)
    final = torch.where(mask.any(dim=1), rewards.to(dtype), 0.0)  # (B,)
    token_rewards = torch.zeros(mask.shape, dtype=dtype, device=rewards.device)  # (B, T)
    token_rewards = token_rewards.scatter(1, last.unsqueeze(1), final.unsqueeze(1))
    if kl is not None:
        token_rewards = token_rewards - kl_coef * kl.to(dtype)
    return torch.where(mask, token_rewards, 0.0)


def _check_discount(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def discounted_returns(token_rewards: Tensor, action_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = Σ_{k≥t} γ^{k−t} r_k`` (algorithm.md §3).

    The sum is not reset at masked tokens inside a response: they contribute 0 reward and, as in
    OpenRLHF, still count as a step for the discount (k − t is a position difference). Masked
    positions are 0 in the output.

    token_rewards, action_mask (B, T) -> (B, T).
    """
    _check_discount("gamma", gamma)
    mask = action_mask.bool()  # (B, T)
    rewards = torch.where(mask, token_rewards, 0.0)  # (B, T)
    if gamma == 1.0:
        returns = rewards.flip(1).cumsum(1).flip(1)  # (B, T) suffix sums
    else:
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])  # (B,)
        for t in reversed(range(rewards.size(1))):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
    return torch.where(mask, returns, 0.0)


def gae(
    token_rewards: Tensor, values: Tensor, action_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation for the ``ppo`` estimator (algorithm.md §4).

    ``δ_t = r_t + γ V_{t+1} − V_t`` (V past the last token is 0), ``A_t = δ_t + γλ A_{t+1}``,
    returns ``= A_t + V_t`` (the critic's targets). As in OpenRLHF, values and rewards at masked
    positions are taken as 0, so with λ = 1 ``A_t = G_t − V_t`` exactly as in
    :func:`discounted_returns`. Masked positions are 0 in both outputs.

    Args:
        token_rewards: (B, T) shaped rewards.
        values: (B, T) critic values V(s_t).
        action_mask: (B, T).
    Returns:
        ``(advantages, returns)``, both (B, T).
    """
    _check_discount("gamma", gamma)
    _check_discount("lam", lam)
    mask = action_mask.bool()  # (B, T)
    rewards = torch.where(mask, token_rewards, 0.0)  # (B, T)
    values = torch.where(mask, values, 0.0)  # (B, T)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T)
    deltas = rewards + gamma * next_values - values  # (B, T)
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])  # (B,)
    for t in reversed(range(deltas.size(1))):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    returns = advantages + values
    return torch.where(mask, advantages, 0.0), torch.where(mask, returns, 0.0)


@dataclass(frozen=True)
class AdvantageEstimatorSpec:
    """One row of algorithm.md §4's table."""

    name: str
    scalar_baseline: Callable[[Tensor, int], Tensor] | None
    """Applied to the (B,) scalar rewards before shaping; None = no baseline."""
    kl_in_reward: bool
    """Shape the k1 KL into the token rewards (§2)."""
    kl_loss_estimator: KLEstimator | None
    """KL as a loss term with this estimator instead (§5); the trainer reads this."""
    global_normalization: bool
    """Whiten advantages over every action token of every rank."""
    needs_values: bool
    """Advantages by GAE from a critic's values."""
    min_samples_per_prompt: int
    """Group baselines need at least 2."""


# algorithm.md §4, row by row. Only group baselines need n >= 2.
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimatorSpec] = {
    s.name: s
    for s in (
        AdvantageEstimatorSpec(
            name="reinforce_pp",
            scalar_baseline=None,
            kl_in_reward=True,
            kl_loss_estimator=None,
            global_normalization=True,
            needs_values=False,
            min_samples_per_prompt=1,
        ),
        AdvantageEstimatorSpec(
            name="reinforce_pp_baseline",
            scalar_baseline=group_mean_baseline,
            kl_in_reward=False,
            kl_loss_estimator="k2",
            global_normalization=True,
            needs_values=False,
            min_samples_per_prompt=2,
        ),
        AdvantageEstimatorSpec(
            name="grpo",
            scalar_baseline=group_normalized,
            kl_in_reward=False,
            kl_loss_estimator="k3",
            global_normalization=False,
            needs_values=False,
            min_samples_per_prompt=2,
        ),
        AdvantageEstimatorSpec(
            name="rloo",
            scalar_baseline=leave_one_out_baseline,
            kl_in_reward=True,
            kl_loss_estimator=None,
            global_normalization=False,
            needs_values=False,
            min_samples_per_prompt=2,
        ),
        AdvantageEstimatorSpec(
            name="ppo",
            scalar_baseline=None,
            kl_in_reward=True,
            kl_loss_estimator=None,
            global_normalization=True,
            needs_values=True,
            min_samples_per_prompt=1,
        ),
    )
}


EstimatorName = Literal[tuple(ADVANTAGE_ESTIMATORS)]  # type: ignore[valid-type]
"""The estimators' names, from the table: the config's choices (and the CLI's) come from here."""


def get_estimator(name: str) -> AdvantageEstimatorSpec:
    """Look up an estimator of algorithm.md §4 by name; unknown names raise ``ValueError``."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        valid = ", ".join(ADVANTAGE_ESTIMATORS)
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {valid}") from None


@dataclass
class AdvantageOutput:
    """What :func:`compute_advantages` hands the trainer; every tensor is detached."""

    advantages: Tensor  # (B, T) 0 at masked positions
    returns: Tensor  # (B, T) G_t, or GAE returns (critic targets) for ppo
    scalar_rewards_after_baseline: Tensor  # (B,)
    stats: dict[str, float] = field(default_factory=dict)
    """``advantage_mean``/``advantage_std`` before normalisation (global when a group is given)."""


def compute_advantages(
    estimator: str,
    rewards: Tensor,
    kl: Tensor | None,
    action_mask: Tensor,
    *,
    n_samples_per_prompt: int,
    kl_coef: float,
    gamma: float = 1.0,
    lam: float = 1.0,
    values: Tensor | None = None,
    reward_clip: float | None = None,
    clip_order: RewardClipOrder = "clip_then_baseline",
    group: dist.ProcessGroup | None = None,
) -> AdvantageOutput:
    """Clip and baseline → shape → returns (or GAE) → global whitening, per algorithm.md §2–§4.

    For estimators that put KL in a loss (``spec.kl_loss_estimator``), ``kl`` and ``kl_coef`` are
    ignored here; the trainer applies them in the loss. ``lam`` is used by ``ppo`` only.
    With ``grpo`` and γ = 1 every token's advantage equals the group-normalised scalar.

    Args:
        estimator: a key of :data:`ADVANTAGE_ESTIMATORS`.
        rewards: (B,) scalar rewards, already normalised (§2).
        kl: (B, T) k1 KL of π_old vs π_ref per token, or None when KL is not in the reward.
        action_mask: (B, T).
        values: (B, T) critic values, required by ``ppo`` and rejected otherwise.
        reward_clip: clip scalar rewards to ±reward_clip (§2); None: no clipping.
        clip_order: with a group baseline, clip the raw rewards before subtracting it (our
            default) or clip the baselined rewards (OpenRLHF's order); see algorithm.md §2.
            Without a baseline the two are the same.
        group: process group for the global whitening and the logged stats; None = this rank.
    """
    spec = get_estimator(estimator)
    if action_mask.dim() != 2 or rewards.shape != action_mask.shape[:1]:
        raise ValueError(
            f"expected rewards (B,) and action_mask (B, T), got {tuple(rewards.shape)} and "
            f"{tuple(action_mask.shape)}"
        )
    if n_samples_per_prompt < spec.min_samples_per_prompt:
        raise ValueError(
            f"advantage estimator {spec.name!r} uses a per-prompt group baseline and needs "
            f"n_samples_per_prompt >= {spec.min_samples_per_prompt}, got {n_samples_per_prompt}"
        )
    if spec.needs_values and values is None:
        raise ValueError(f"advantage estimator {spec.name!r} (GAE) needs critic values")
    if not spec.needs_values and values is not None:
        raise ValueError(f"advantage estimator {spec.name!r} has no critic; do not pass values")
    if spec.kl_in_reward and kl is None and kl_coef != 0:
        raise ValueError(f"advantage estimator {spec.name!r} shapes KL into the reward: pass kl")

    if clip_order not in ("clip_then_baseline", "baseline_then_clip"):
        raise ValueError(f"unknown clip_order {clip_order!r}")

    with torch.no_grad():
        scalar = rewards  # (B,)
        clip_first = clip_order == "clip_then_baseline"
        if reward_clip is not None and clip_first:
            scalar = clip_rewards(scalar, reward_clip)
        if spec.scalar_baseline is not None:
            scalar = spec.scalar_baseline(scalar, n_samples_per_prompt)
        if reward_clip is not None and not clip_first:
            scalar = clip_rewards(scalar, reward_clip)
        token_kl = kl if spec.kl_in_reward else None
        token_rewards = shape_token_rewards(scalar, token_kl, action_mask, kl_coef)  # (B, T)
        if spec.needs_values:
            advantages, returns = gae(token_rewards, values, action_mask, gamma, lam)
        else:
            returns = discounted_returns(token_rewards, action_mask, gamma)  # (B, T)
            advantages = returns.clone()  # distinct tensors: the trainer may edit either
        mean, var = masked_global_mean_var(advantages, action_mask, group)
        stats = {"advantage_mean": mean.item(), "advantage_std": var.sqrt().item()}
        if spec.global_normalization:
            advantages = apply_whitening(advantages, action_mask, mean, var, eps=WHITEN_EPS)
    return AdvantageOutput(advantages, returns, scalar.detach(), stats)
