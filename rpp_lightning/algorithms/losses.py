"""PPO-clip policy loss, KL loss, entropy and token log-probs (algorithm.md §5).

Every loss is aggregated per token: the sum over the action tokens of a micro-batch divided by
``num_action_tokens``. The trainer passes the action-token count of the whole mini-batch (all
micro-batches, all ranks), so summing the micro-batch losses (gradient accumulation) and
averaging gradients over ranks gives each token of the mini-batch the same weight, however long
its response. Without it, the count of this batch is used.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rpp_lightning.algorithms.kl import KLEstimator, kl_estimate
from rpp_lightning.algorithms.normalization import masked_sum

LOG_RATIO_CLAMP = 20.0  # algorithm.md §5: ρ = exp(clamp(log π_θ − log π_old, −20, 20))
_CHUNK_ELEMENTS = 1 << 26  # logits elements per chunk: 256 MiB in float32, whatever the vocab


def masked_token_mean(
    x: Tensor, action_mask: Tensor, num_action_tokens: Tensor | float | None = None
) -> Tensor:
    """``Σ_{action tokens} x / num_action_tokens`` (algorithm.md §5 aggregation).

    ``num_action_tokens=None`` uses this batch's action-token count. A zero count gives 0, not NaN.

    x, action_mask (B, T) -> scalar.
    """
    total = masked_sum(x, action_mask)
    if num_action_tokens is None:
        num_action_tokens = action_mask.bool().sum()
    count = torch.as_tensor(num_action_tokens, dtype=total.dtype, device=total.device)
    return total / count.clamp(min=1.0)


def _row_chunks(logits: Tensor) -> tuple[list[Tensor], torch.dtype]:
    """Split (..., V) logits into (N_i, V) row chunks so an upcast copy never holds all of them."""
    vocab = logits.size(-1)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 log-softmax is too coarse
    return list(logits.reshape(-1, vocab).split(rows)), dtype


def position_ids(attention_mask: Tensor) -> Tensor:
    """Position of each token among the real tokens of its row (..., L): left padding does not
    shift positions, so a left-padded prompt is seen as the same prompt unpadded. The trainer's
    forwards and the generation server's use this one formula, so their log-probs agree."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def log_probs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label token, ``x[label] − logsumexp(x)`` (algorithm.md §5).

    Computed in row chunks in at least float32, so a bf16 (B, T, V) tensor is never upcast whole.
    ``labels`` must be valid vocabulary ids everywhere (put any id, e.g. the pad id, on padding;
    the mask removes it later).

    logits (B, T, V), labels (B, T) -> (B, T) float32 (float64 for float64 logits).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)"
        )
    chunks, dtype = _row_chunks(logits)
    flat_labels = labels.reshape(-1).split([c.size(0) for c in chunks])
    out = []
    for chunk, chunk_labels in zip(chunks, flat_labels, strict=True):
        chunk = chunk.to(dtype)  # (N, V)
        picked = chunk.gather(-1, chunk_labels.unsqueeze(-1)).squeeze(-1)  # (N,)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out).view(labels.shape)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``H = −Σ_v p_v log p_v`` of the next-token distribution (algorithm.md §5 bonus).

    Safe with ``-inf`` logits (masked vocabulary): they contribute 0 and no NaN gradient.

    logits (B, T, V) -> (B, T) float32 (float64 for float64 logits).
    """
    chunks, dtype = _row_chunks(logits)
    out = []
    for chunk in chunks:
        log_p = F.log_softmax(chunk.to(dtype), dim=-1)  # (N, V)
        p = log_p.exp()
        # 0 · log 0 is NaN in floating point; by continuity it is 0.
        out.append(-(p * torch.where(p > 0, log_p, 0.0)).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])


@dataclass
class PolicyLossOutput:
    """PPO-clip loss and its diagnostics, all aggregated like the loss (see module docstring)."""

    loss: Tensor  # scalar, differentiable w.r.t. log_probs
    clip_fraction: Tensor  # scalar, share of action tokens whose gradient a clip removed
    approx_kl: Tensor  # scalar, mean of (ρ − 1) − log ρ: k3 estimate of KL(π_old ‖ π_θ), ≥ 0
    ratio_mean: Tensor  # scalar, mean of ρ


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    num_action_tokens: Tensor | float | None = None,
) -> PolicyLossOutput:
    """PPO-clip surrogate loss without a critic (algorithm.md §5).

    ``ρ = exp(clamp(log π_θ − log π_old, −20, 20))``,
    ``L_t = −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A)``; with ``dual_clip = c > 1``, for
    ``A < 0`` only, ``L_t ← min(L_t, −c A)`` so a huge ratio on a bad token has a bounded loss.
    ``old_log_probs`` and ``advantages`` are treated as constants (detached).

    Args:
        log_probs: (B, T) log π_θ of the taken tokens, with gradient.
        old_log_probs: (B, T) log π_old from the rollout.
        advantages: (B, T).
        action_mask: (B, T).
        num_action_tokens: aggregation denominator; default this batch's action-token count.
    """
    if not 0.0 <= clip_eps_low < 1.0 or clip_eps_high < 0.0:
        raise ValueError(
            f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low}, "
            f"{clip_eps_high}"
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    # Padding may hold garbage (−inf log-probs, NaN advantages). Masking the loss alone is not
    # enough: 0 · NaN in the backward pass of ρ·A would still poison the gradient.
    mask = action_mask.bool()  # (B, T)
    advantages = torch.where(mask, advantages.detach(), 0.0)  # (B, T)
    log_ratio = torch.where(mask, log_probs - old_log_probs.detach(), 0.0)  # (B, T)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()  # (B, T), at most e^20 ≈ 4.9e8: finite in float32
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    token_loss = -torch.min(surr1, surr2)  # (B, T)
    clipped = surr2 < surr1  # the clipped term was taken: no gradient from this token
    if dual_clip is not None:
        bound = -dual_clip * advantages  # > 0 where A < 0
        dual = (advantages < 0) & (token_loss > bound)
        token_loss = torch.where(dual, bound, token_loss)
        clipped = clipped | dual
    loss = masked_token_mean(token_loss, action_mask, num_action_tokens)

    with torch.no_grad():
        clip_fraction = masked_token_mean(clipped.float(), action_mask, num_action_tokens)
        approx_kl = masked_token_mean((ratio - 1.0) - log_ratio, action_mask, num_action_tokens)
        ratio_mean = masked_token_mean(ratio, action_mask, num_action_tokens)
    return PolicyLossOutput(loss, clip_fraction, approx_kl, ratio_mean)


def kl_loss(
    log_probs: Tensor,
    ref_log_probs: Tensor,
    action_mask: Tensor,
    estimator: KLEstimator,
    num_action_tokens: Tensor | float | None = None,
) -> Tensor:
    """Token-level mean of ``k(log π_θ, log π_ref)`` for KL as a loss (algorithm.md §1, §5).

    The caller multiplies by β: ``L += β · kl_loss(...)``. ``k2`` gives the reverse-KL gradient;
    ``k3`` is GRPO's choice. Aggregated like :func:`policy_loss`.

    log_probs, ref_log_probs, action_mask (B, T) -> scalar, differentiable w.r.t. log_probs.
    """
    # Zero both inputs on padding (r = 0 there) so garbage cannot reach the gradient.
    mask = action_mask.bool()  # (B, T)
    log_probs = torch.where(mask, log_probs, 0.0)
    ref_log_probs = torch.where(mask, ref_log_probs.detach(), 0.0)
    kl = kl_estimate(log_probs, ref_log_probs, estimator)  # (B, T)
    return masked_token_mean(kl, action_mask, num_action_tokens)


@dataclass
class ValueLossOutput:
    """Clipped value loss and its diagnostics, aggregated like the policy loss."""

    loss: Tensor  # scalar, differentiable w.r.t. values
    clip_fraction: Tensor  # scalar, share of action tokens where the clipped error was taken


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    *,
    value_clip: float | None = 0.2,
    num_action_tokens: Tensor | float | None = None,
) -> ValueLossOutput:
    """PPO's clipped value loss for the critic of the ``ppo`` estimator (algorithm.md §5).

    ``V_clip = V_old + clamp(V − V_old, −c, c)``, ``L_t = ½ max((V − G)², (V_clip − G)²)``: the
    critic cannot profit from moving a value more than ``c`` from the rollout's value in one
    batch. ``value_clip=None`` gives ``½ (V − G)²``. ``old_values`` and ``returns`` (the GAE
    targets) are constants.

    values, old_values, returns, action_mask (B, T) -> scalar loss.
    """
    if value_clip is not None and value_clip <= 0:
        raise ValueError(f"value_clip must be > 0 (or None), got {value_clip}")
    mask = action_mask.bool()  # (B, T)
    returns = torch.where(mask, returns.detach(), 0.0)  # (B, T) garbage on padding stays out
    values = torch.where(mask, values, 0.0)
    error = (values - returns).square()  # (B, T)
    clipped = torch.zeros_like(mask)
    if value_clip is not None:
        old = torch.where(mask, old_values.detach(), 0.0)
        values_clipped = old + (values - old).clamp(-value_clip, value_clip)
        error_clipped = (values_clipped - returns).square()
        clipped = error_clipped > error
        error = torch.maximum(error, error_clipped)
    loss = 0.5 * masked_token_mean(error, action_mask, num_action_tokens)
    with torch.no_grad():
        clip_fraction = masked_token_mean(clipped.float(), action_mask, num_action_tokens)
    return ValueLossOutput(loss, clip_fraction)
