"""Per-token KL estimators between two policies (algorithm.md §1).

All three estimate KL from a single sampled token, using only the log-probabilities of that token
under both policies, so they cost nothing beyond the two forward passes we already run.
"""

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_estimate(
    log_probs: Tensor, ref_log_probs: Tensor, estimator: KLEstimator = "k1", clamp: float = 10.0
) -> Tensor:
    """Per-token KL estimate from ``r = log_probs - ref_log_probs`` (algorithm.md §1).

    - ``k1 = r``: unbiased for KL(π‖π_ref), the default when KL is shaped into the reward.
    - ``k2 = r² / 2``: its gradient is the reverse-KL gradient, so use it as a loss term.
    - ``k3 = exp(-r) - 1 + r``: GRPO's choice, non-negative, lower variance than k1.

    The result is clamped to ``[-clamp, clamp]`` because one token with a huge log-ratio would
    otherwise dominate a whole batch. Differentiable w.r.t. both inputs (zero gradient where the
    clamp is active). Padding positions are not masked here: callers mask.

    Args:
        log_probs: (B, T) log π(a_t) of the policy being measured.
        ref_log_probs: (B, T) log π_ref(a_t) of the reference policy.
        estimator: one of ``"k1"``, ``"k2"``, ``"k3"``.
        clamp: symmetric bound on the estimate, must be > 0.

    Returns:
        (B, T) KL estimate per token.
    """
    if clamp <= 0:
        raise ValueError(f"kl clamp must be > 0, got {clamp}")
    # bf16 log-probs differ in the 3rd significant digit; subtract in at least float32.
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    log_ratio = log_probs.to(dtype) - ref_log_probs.to(dtype)  # (B, T)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = log_ratio.square() / 2
    elif estimator == "k3":
        # exp(-r) overflows for r < -88 in float32; the clamp below cannot undo an inf, so bound
        # r first. exp(±50) is far past the ±clamp output bound either way.
        r = log_ratio.clamp(-50.0, 50.0)
        kl = torch.expm1(-r) + r
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    return kl.clamp(-clamp, clamp)  # (B, T)
