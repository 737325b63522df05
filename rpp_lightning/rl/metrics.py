"""What the trainer logs every step (algorithm.md §7), computed from one rank's batch.

Values are plain floats of this rank, or None where a metric is undefined here (no verifier
verdicts, no sample routed to a source). Every rank returns the same keys, so the module can
reduce them across ranks in one all-reduce: means over the ranks where they are defined (every
rank holds the same number of samples), maxima for `.../max`.
"""

from __future__ import annotations

import resource
import statistics
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from rpp_lightning.algorithms import masked_mean
from rpp_lightning.clients.rewards import RewardBatch
from rpp_lightning.rl.experience import Experience

if TYPE_CHECKING:  # for annotations only: metrics read the experience, never make it
    from rpp_lightning.rl.experience_maker import IterationExperience


def rollout_metrics(
    exp: Experience, rollouts, rewards: RewardBatch, max_new_tokens: int
) -> dict[str, float | None]:
    """Reward, accuracy, KL, response length and engine/trainer log-prob gap of a batch."""
    mask = exp.action_mask.float()  # (N, R)
    lengths = mask.sum(1)  # (N,)
    metrics = {
        "reward": statistics.fmean(rewards.total),
        "reward/after_norm_clip": exp.rewards.mean().item(),
        "kl": None,  # without a reference model (kl_coef 0) there is no KL to log
        "kl_x_length": None,
        "response_length": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "response_length/clip_ratio": (lengths >= max_new_tokens).float().mean().item(),
    }
    if exp.ref_log_probs is not None:
        log_ratio = exp.old_log_probs - exp.ref_log_probs  # (N, R): k1 per token
        metrics["kl"] = masked_mean(log_ratio, mask).item()
        metrics["kl_x_length"] = (log_ratio * mask).sum(1).mean().item()
    verdicts = [c for c in rewards.correct if c is not None]
    metrics["accuracy"] = sum(verdicts) / len(verdicts) if verdicts else None
    for name, values in rewards.per_source.items():
        scored = [v for v in values if v is not None]
        metrics[f"reward/{name}"] = statistics.fmean(scored) if scored else None
    # Engine log-probs are logged, never trusted: their gap to π_old shows engine/trainer drift.
    engine = torch.zeros_like(exp.old_log_probs)
    for row, rollout in enumerate(rollouts):
        values = torch.tensor(rollout.logprobs, dtype=engine.dtype)
        engine[row, : len(values)] = values.to(engine.device)
    metrics["logprob_gap"] = masked_mean((engine - exp.old_log_probs).abs(), mask).item()
    # the version stamps of the weights that sampled them (the client refuses any but one)
    metrics["weights_version/rollouts"] = float(min(r.weights_version for r in rollouts))
    return metrics


def iteration_metrics(
    made: IterationExperience,
    steps: list[dict[str, torch.Tensor]],
    timings: dict[str, float],
    max_new_tokens: int,
) -> dict[str, float | None]:
    """Every metric of algorithm.md §7 for one rank's iteration: rollouts and rewards, the
    updates, π_old's entropy, advantages before normalisation, phase times, tokens/s."""
    exp = made.exp
    metrics = rollout_metrics(exp, made.rollouts, made.rewards, max_new_tokens)
    metrics.update(update_metrics(steps))
    metrics["entropy"] = masked_mean(made.entropy, exp.action_mask).item()
    metrics.update({f"adv/{k}": v for k, v in made.advantage_stats.items()})
    metrics.update({f"time/{k}": v for k, v in timings.items()})
    metrics["perf/tokens_per_s"] = exp.action_mask.sum().item() / max(timings["generate"], 1e-9)
    # the trainer process's high-water mark so far (Linux reports KiB); the largest rank's
    metrics["memory/peak_rss_mb/max"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return metrics


def staleness_metrics(rollouts: list, trained_by: int, refused: int) -> dict[str, float]:
    """Staleness of the rollouts against `trained_by`, the version the update started from, and
    how many were refused as too old on the way (algorithm.md §9)."""
    ages = [trained_by - r.weights_version for r in rollouts]
    return {
        "staleness": sum(ages) / len(ages),
        "staleness/max": float(max(ages)),
        "staleness/refused": float(refused),
    }


def update_metrics(steps: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Means over the optimizer steps of one iteration (loss, clip fraction, grad norm...)."""
    keys = steps[0].keys() if steps else []
    return {key: statistics.fmean(float(step[key]) for step in steps) for key in keys}


MIN_OVER_RANKS = frozenset({"weights_version/rollouts"})
"""Metrics whose global value is the smallest over the ranks: the oldest weights that sampled
any rollout of the batch. (Ranks ask for their shares apart, so with max_staleness a push can
land between two ranks' requests, and their batches are of two versions.)"""


def reduce_metrics(
    metrics: dict[str, float | None], group: dist.ProcessGroup | None, device: torch.device
) -> dict[str, float]:
    """Global values of per-rank metrics: means over the ranks where a metric is defined,
    maxima for keys ending in "/max", minima for MIN_OVER_RANKS. Metrics undefined on every
    rank are dropped."""
    keys = sorted(metrics)  # the same keys on every rank (see rollout_metrics)
    values = torch.tensor([metrics[k] if metrics[k] is not None else 0.0 for k in keys])
    defined = torch.tensor([float(metrics[k] is not None) for k in keys])
    if group is not None:
        is_max = torch.tensor([k.endswith("/max") for k in keys])
        is_min = torch.tensor([k in MIN_OVER_RANKS for k in keys])
        sums = torch.stack([values * defined, defined]).to(device)  # (2, K)
        # one MAX all-reduce gives both: the maxima, and the minima as maxima of negatives
        signed = torch.where(is_min, -values, values)
        extrema = torch.where(defined.bool(), signed, float("-inf")).to(device)  # (K,)
        dist.all_reduce(sums, group=group)
        dist.all_reduce(extrema, op=dist.ReduceOp.MAX, group=group)
        means, extrema = (sums[0] / sums[1].clamp(min=1)).cpu(), extrema.cpu()
        values = torch.where(is_max, extrema, torch.where(is_min, -extrema, means))
        defined = (sums[1] > 0).float().cpu()
    return {k: v for k, v, ok in zip(keys, values.tolist(), defined.tolist(), strict=True) if ok}
