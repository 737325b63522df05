"""REINFORCE++ math as pure tensor functions; see docs/algorithm.md for the formulas."""

from rpp_lightning.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimatorSpec,
    AdvantageOutput,
    compute_advantages,
    discounted_returns,
    gae,
    get_estimator,
    group_mean_baseline,
    group_normalized,
    leave_one_out_baseline,
    shape_token_rewards,
)
from rpp_lightning.algorithms.kl import KLEstimator, kl_estimate
from rpp_lightning.algorithms.losses import (
    PolicyLossOutput,
    entropy_from_logits,
    kl_loss,
    log_probs_from_logits,
    masked_token_mean,
    policy_loss,
)
from rpp_lightning.algorithms.normalization import (
    RunningMeanStd,
    apply_whitening,
    clip_rewards,
    masked_global_mean_var,
    masked_mean,
    masked_sum,
    masked_whiten,
    normalize_rewards,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimatorSpec",
    "AdvantageOutput",
    "KLEstimator",
    "PolicyLossOutput",
    "RunningMeanStd",
    "apply_whitening",
    "clip_rewards",
    "compute_advantages",
    "discounted_returns",
    "entropy_from_logits",
    "gae",
    "get_estimator",
    "group_mean_baseline",
    "group_normalized",
    "kl_estimate",
    "kl_loss",
    "leave_one_out_baseline",
    "log_probs_from_logits",
    "masked_global_mean_var",
    "masked_mean",
    "masked_sum",
    "masked_token_mean",
    "masked_whiten",
    "normalize_rewards",
    "policy_loss",
    "shape_token_rewards",
]
