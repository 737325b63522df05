"""The policy update (algorithm.md §5-6): epochs × mini-batches of PPO-clip steps with gradient
accumulation over micro-batches; the micro-batch loss; the critic's value steps (`ppo`);
optimizer and LR schedule; the cross-rank check that keeps FSDP collectives in step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rpp_lightning import algorithms as A
from rpp_lightning.config import AlgorithmConfig, CriticConfig, OptimConfig
from rpp_lightning.rl.critic import response_values
from rpp_lightning.rl.experience import Experience
from rpp_lightning.rl.policy import response_log_probs


@dataclass(frozen=True)
class PolicyUpdateConfig:
    """What shapes one rollout batch's update."""

    algorithm: AlgorithmConfig
    estimator: A.AdvantageEstimatorSpec
    temperature: float = 1.0  # the sampling temperature: log-probs are taken at it


MicroBatchLoss = Callable[[Experience, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
PolicyForward = tuple[torch.Tensor, torch.Tensor | None]
"""log π_θ (N, R) and entropy (N, R) of a whole rollout batch, with their autograd graph."""


def single_forward_update(algorithm: AlgorithmConfig, rows: int) -> bool:
    """Whether the update of `rows` rollouts is one optimizer step on one micro-batch of them all
    (one epoch, mini- and micro-batch ≥ rows). Then π_θ at the update's forward is π_old, so the
    forward that gives log π_old can carry its graph into the update instead of being run twice
    (what TRL does with one iteration per batch): the same numbers, one forward fewer. Only for
    rollouts of the current weights: with older ones (`rollout.max_staleness`), π_old is the
    policy that sampled them, not π_θ (experience_maker.py decides)."""
    return (
        algorithm.epochs == 1 and min(algorithm.mini_batch_size, algorithm.micro_batch_size) >= rows
    )


def policy_update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    config: PolicyUpdateConfig,
    backward: Callable[[torch.Tensor], None],
    shuffle: torch.Generator,
    group: dist.ProcessGroup | None = None,
    forward: PolicyForward | None = None,
) -> list[dict[str, torch.Tensor]]:
    """`epochs` passes of shuffled mini-batches over `exp`, one optimizer step per mini-batch.

    `backward` is Lightning's `manual_backward` (plain `loss.backward()` outside Lightning).
    Every rank must hold the same number of rows (see `check_same_rows_on_every_rank`), so that
    all run the same number of forwards and optimizer steps. `forward`: the whole batch's
    log-probs with their graph, when `single_forward_update` holds (the experience phase ran
    them). Returns each optimizer step's statistics (global: the same on every rank) and its
    gradient norm.
    """
    cfg = config.algorithm
    if forward is not None and not single_forward_update(cfg, len(exp)):
        raise ValueError("a precomputed forward needs one optimizer step on one micro-batch")
    unused = [forward]

    def loss(micro: Experience, tokens: torch.Tensor):
        # the single micro-batch of a single-forward update is the batch itself
        given = unused.pop() if unused and micro is exp else None
        return micro_batch_loss(
            policy, micro, tokens, cfg, config.estimator, config.temperature, given
        )

    return _mini_batch_steps(policy, optimizer, exp, cfg, loss, backward, shuffle, group)


def critic_update(
    critic: nn.Module,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    algorithm: AlgorithmConfig,
    critic_config: CriticConfig,
    backward: Callable[[torch.Tensor], None],
    shuffle: torch.Generator,
    group: dist.ProcessGroup | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The critic's share of the iteration (`ppo`): the same epochs × mini-batches as the
    policy, each step fitting V to the GAE returns with the clipped value loss."""

    def loss(micro: Experience, tokens: torch.Tensor):
        values = response_values(critic, micro.sequences, micro.attention_mask, micro.num_actions)
        out = A.value_loss(
            values,
            micro.values,
            micro.returns,
            micro.action_mask,
            value_clip=critic_config.value_clip,
            num_action_tokens=tokens,
        )
        with torch.no_grad():
            mean_value = A.masked_token_mean(values, micro.action_mask, tokens)
        stats = {"value_loss": out.loss, "value_clip_fraction": out.clip_fraction}
        stats["values"] = mean_value
        return critic_config.value_loss_coef * out.loss, stats

    steps = _mini_batch_steps(critic, optimizer, exp, algorithm, loss, backward, shuffle, group)
    return [{f"critic/{k}": v for k, v in step.items()} for step in steps]


def _mini_batch_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    cfg: AlgorithmConfig,
    loss_fn: MicroBatchLoss,
    backward: Callable[[torch.Tensor], None],
    shuffle: torch.Generator,
    group: dist.ProcessGroup | None,
) -> list[dict[str, torch.Tensor]]:
    if len(exp) % cfg.mini_batch_size:
        raise ValueError(
            f"rollout batch of {len(exp)} samples is not a multiple of mini_batch_size "
            f"{cfg.mini_batch_size}: set data.batch_size × n_samples accordingly"
        )
    world = dist.get_world_size(group) if group is not None else 1
    steps = []
    for _ in range(cfg.epochs):
        for mini in exp.mini_batches(cfg.mini_batch_size, shuffle):
            # Token-level aggregation across ranks (algorithm.md §5): divide by the action
            # tokens of the whole mini-batch on all ranks; FSDP averages gradients over ranks,
            # so scale by the world size to keep a plain global token mean.
            tokens = mini.action_mask.sum().float()
            if group is not None:
                dist.all_reduce(tokens, group=group)
            sums: dict[str, torch.Tensor] = {}
            for micro in mini.micro_batches(cfg.micro_batch_size):
                loss, stats = loss_fn(micro, tokens)
                backward(loss * world)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0) + value.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append(sums)
            sums["grad_norm"] = grad_norm.detach()  # already global: not summed below
    return _sum_shares_over_ranks(steps, group)


def _sum_shares_over_ranks(
    steps: list[dict[str, torch.Tensor]], group: dist.ProcessGroup | None
) -> list[dict[str, torch.Tensor]]:
    """Each rank's statistics are its share of a global token mean (divided by every rank's
    tokens): their sum over ranks is the mean. One all-reduce for the whole update."""
    if group is None or not steps:
        return steps
    keys = [k for k in steps[0] if k != "grad_norm"]
    shares = torch.stack([torch.stack([step[k] for k in keys]) for step in steps])  # (S, K)
    dist.all_reduce(shares, group=group)
    return [
        {**dict(zip(keys, row, strict=True)), "grad_norm": step["grad_norm"]}
        for step, row in zip(steps, shares, strict=True)
    ]


def micro_batch_loss(
    policy: nn.Module,
    micro: Experience,
    num_action_tokens: torch.Tensor,
    algorithm: AlgorithmConfig,
    estimator: A.AdvantageEstimatorSpec,
    temperature: float = 1.0,
    forward: PolicyForward | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss (+ KL loss for estimators that put KL there, − entropy bonus) of `micro`,
    with log-probs at the sampling `temperature` (as π_old's were), or those of `forward`.

    Every term is a sum over this micro-batch's action tokens divided by `num_action_tokens`,
    the mini-batch's token count over all ranks, so summing micro-batch gradients (and averaging
    over ranks, times the world size) gives the token-level mean of the whole mini-batch.
    """
    with_entropy = algorithm.entropy_coef > 0
    if forward is None:
        forward = response_log_probs(
            policy, micro.sequences, micro.attention_mask, micro.num_actions, with_entropy,
            temperature,
        )  # fmt: skip
    log_probs, entropy = forward  # (n, R)
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
    if estimator.kl_loss_estimator is not None and micro.ref_log_probs is not None:
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
        stats["entropy_bonus"] = mean_entropy
    return loss, stats


def build_optimizer(
    policy: nn.Module, optim: OptimConfig, total_iterations: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, and its schedule: linear warmup, then cosine down
    to lr × min_lr_ratio. The scheduler is stepped once per iteration, not per optimizer step."""
    opt = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )
    warmup = round(total_iterations * optim.warmup_ratio)
    floor = optim.min_lr_ratio

    def lr_factor(iteration: int) -> float:
        if iteration < warmup:
            return (iteration + 1) / (warmup + 1)
        progress = min(1.0, (iteration - warmup) / max(1, total_iterations - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def check_same_rows_on_every_rank(
    rows: int, group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """Raise unless every rank holds `rows` rollouts.

    FSDP all-gathers in every forward: ranks that ran different numbers of micro-batches would
    wait on each other forever. Equal rows per rank guarantee equal forward and step counts,
    whatever the response lengths.
    """
    if group is None:
        return
    bounds = torch.tensor([rows, -rows], device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
    if int(bounds[0]) != -int(bounds[1]):
        raise RuntimeError(
            f"ranks hold different rollout batch sizes (max {int(bounds[0])}, "
            f"min {-int(bounds[1])}, {rows} here)"
        )
