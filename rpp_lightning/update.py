"""The loss of one micro-batch of a policy update (algorithm.md §5), model forward included."""

from __future__ import annotations

import torch
from torch import nn

from rpp_lightning import algorithms as A
from rpp_lightning.config import AlgorithmConfig
from rpp_lightning.experience import Experience
from rpp_lightning.policy import response_log_probs


def micro_batch_loss(
    policy: nn.Module,
    micro: Experience,
    num_action_tokens: torch.Tensor,
    algorithm: AlgorithmConfig,
    estimator: A.AdvantageEstimatorSpec,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss (+ KL loss for estimators that put KL there, − entropy bonus) of `micro`.

    Every term is a sum over this micro-batch's action tokens divided by `num_action_tokens`,
    the mini-batch's token count over all ranks, so summing micro-batch gradients (and averaging
    over ranks, times the world size) gives the token-level mean of the whole mini-batch.
    """
    with_entropy = algorithm.entropy_coef > 0
    log_probs, entropy = response_log_probs(
        policy, micro.sequences, micro.attention_mask, micro.num_actions, with_entropy
    )  # (n, R)
    out = A.policy_loss(
        log_probs,
        micro.old_log_probs,
        micro.advantages,
        micro.action_mask,
        clip_eps_low=algorithm.clip_eps_low,
        clip_eps_high=algorithm.clip_eps_high,
        dual_clip=algorithm.dual_clip,
        num_action_tokens=num_action_tokens,
    )
    loss = out.loss
    stats = {
        "policy_loss": out.loss,
        "clip_fraction": out.clip_fraction,
        "approx_kl": out.approx_kl,
        "ratio": out.ratio_mean,
    }
    if estimator.kl_loss_estimator is not None:
        kl_term = A.kl_loss(
            log_probs,
            micro.ref_log_probs,
            micro.action_mask,
            estimator.kl_loss_estimator,
            num_action_tokens=num_action_tokens,
        )
        loss = loss + algorithm.kl_coef * kl_term
        stats["kl_loss"] = kl_term
    if with_entropy:
        mean_entropy = A.masked_token_mean(entropy, micro.action_mask, num_action_tokens)
        loss = loss - algorithm.entropy_coef * mean_entropy
        stats["entropy"] = mean_entropy
    return loss, stats
