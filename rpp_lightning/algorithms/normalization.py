"""Masked statistics, global whitening and reward normalisation (algorithm.md §2 and §4).

Masks are 0/1 tensors (bool, int or float) of the same shape as the data; positions where the mask
is 0 may hold garbage (even NaN or inf) and never reach a result or a gradient.

"Global" means across data-parallel ranks: pass a ``torch.distributed`` process group (e.g.
``dist.group.WORLD``) and every rank receives the statistics of the concatenation of all ranks'
batches, whatever each rank's batch size and padding. ``group=None`` means this rank only. Every
rank of the group must make the same calls in the same order (they are collectives).
"""

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

RewardNormalization = Literal["none", "batch", "running"]


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is 1 (algorithm.md §5); ``dim=None`` sums every element."""
    # where() rather than x * mask: NaN/inf under the mask would survive a multiplication.
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` where ``mask`` is 1; 0, not NaN, where it is all zero (algorithm.md §4)."""
    keep = mask.bool().expand_as(x)
    count = keep.sum() if dim is None else keep.sum(dim)
    # An empty selection has sum 0, so dividing by max(count, 1) yields 0 there.
    return masked_sum(x, keep, dim) / count.clamp(min=1).to(x.dtype)


def _global_moments(x: Tensor, mask: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """(3,) float64 [Σx, Σx², count] over masked elements, summed over ``group`` if given."""
    keep = mask.bool().expand_as(x)
    xd = torch.where(keep, x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
    moments = torch.stack([xd.sum(), xd.square().sum(), keep.sum().double()])  # (3,)
    if group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        # float64 so the sum of squares of a large batch does not lose the variance to rounding.
        dist.all_reduce(moments, op=dist.ReduceOp.SUM, group=group)
    return moments


def masked_global_mean_var(
    x: Tensor, mask: Tensor, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """Token-weighted mean and population variance of masked ``x`` (algorithm.md §4).

    With ``group`` the (Σx, Σx², count) triple is all-reduced in float64, so the result equals the
    statistics of the concatenated batch of every rank. Both are 0 when nothing is selected.

    Returns:
        ``(mean, var)``: 0-dim tensors in ``x``'s dtype promoted to at least float32.
    """
    total, total_sq, count = _global_moments(x, mask, group)
    count = count.clamp(min=1.0)
    mean = total / count
    var = (total_sq / count - mean.square()).clamp(min=0.0)  # rounding can make it slightly < 0
    dtype = torch.promote_types(x.dtype, torch.float32)
    return mean.to(dtype), var.to(dtype)


def apply_whitening(
    x: Tensor, mask: Tensor, mean: Tensor, var: Tensor, eps: float = 1e-8, shift_mean: bool = True
) -> Tensor:
    """Whiten ``x`` with given statistics: ``(x − μ) / sqrt(max(σ², eps))`` (algorithm.md §4).

    Split out of :func:`masked_whiten` so a caller that already has the statistics (e.g. to log
    them) does not pay for a second all-reduce. ``shift_mean=False`` adds μ back after scaling,
    the TRL/OpenRLHF convention: the spread becomes 1 but the sign of the mean is kept.
    Masked positions are 0 in the output.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    mean, var = mean.to(dtype), var.to(dtype)
    whitened = (x.to(dtype) - mean) * torch.rsqrt(var.clamp(min=eps))
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=dtype, device=x.device))


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    group: dist.ProcessGroup | None = None,
    eps: float = 1e-8,
    shift_mean: bool = True,
) -> Tensor:
    """Global masked whitening (algorithm.md §4): ``(x − μ) / sqrt(max(σ², eps))``.

    μ and σ² are over every masked element of every rank in ``group`` (this rank only if None),
    so the result equals whitening the concatenated batch. Masked positions are 0.

    Args:
        x: (B, T) values, e.g. advantages.
        mask: (B, T) 1 where the value counts.
    Returns:
        (B, T) whitened values.
    """
    mean, var = masked_global_mean_var(x, mask, group)
    return apply_whitening(x, mask, mean, var, eps=eps, shift_mean=shift_mean)


class RunningMeanStd:
    """Mean and variance of every value seen so far, for ``running`` reward normalisation (§2).

    Batches are merged with the parallel algorithm of Chan et al. (the pairwise form of Welford's),
    so merging batch statistics gives exactly the statistics of the concatenation. With ``group``,
    each update first all-reduces the batch moments so that every rank holds the same state.
    Before the first update the mean is 0 and the std 1, so :meth:`normalize` is the identity.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps
        self.count = 0.0
        self._mean = 0.0
        self._var = 1.0

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def var(self) -> float:
        return self._var

    @property
    def std(self) -> float:
        return self._var**0.5

    def update(self, x: Tensor, group: dist.ProcessGroup | None = None) -> None:
        """Merge every element of ``x`` (all ranks' ``x`` when ``group`` is given)."""
        total, total_sq, n = _global_moments(
            x.detach(), torch.ones_like(x, dtype=torch.bool), group
        )
        n = n.item()
        if n == 0:
            return
        batch_mean = total.item() / n
        batch_var = max(total_sq.item() / n - batch_mean**2, 0.0)
        new_count = self.count + n
        delta = batch_mean - self._mean
        m2 = self._var * self.count + batch_var * n + delta**2 * self.count * n / new_count
        self._mean += delta * n / new_count
        self._var = m2 / new_count
        self.count = new_count

    def normalize(self, x: Tensor) -> Tensor:
        """``(x − mean) / sqrt(max(var, eps))`` with the running statistics."""
        return (x - self._mean) / max(self._var, self.eps) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self._mean, "var": self._var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self._mean, self._var = state["count"], state["mean"], state["var"]


def clip_rewards(rewards: Tensor, clip: float) -> Tensor:
    """Clip scalar rewards to ``[-clip, clip]`` (algorithm.md §2, default c = 10)."""
    if clip <= 0:
        raise ValueError(f"reward clip must be > 0, got {clip}")
    return rewards.clamp(-clip, clip)


def normalize_rewards(
    rewards: Tensor,
    mode: RewardNormalization,
    running: RunningMeanStd | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Optional scalar-reward normalisation, applied BEFORE clipping (algorithm.md §2).

    - ``none``: unchanged.
    - ``batch``: z-score over the rollout batch (all ranks' rewards when ``group`` is given).
    - ``running``: update ``running`` with this batch, then z-score with the running statistics.

    Args:
        rewards: (B,) one scalar reward per sample.
    Returns:
        (B,) normalised rewards.
    """
    if mode == "none":
        return rewards
    if mode == "batch":
        return masked_whiten(rewards, torch.ones_like(rewards, dtype=torch.bool), group=group)
    if mode == "running":
        if running is None:
            raise ValueError("reward normalisation 'running' needs a RunningMeanStd instance")
        running.update(rewards, group=group)
        return running.normalize(rewards)
    raise ValueError(f"unknown reward normalisation {mode!r}; valid: none, batch, running")
