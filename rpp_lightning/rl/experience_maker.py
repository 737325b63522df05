"""One iteration's experience, algorithm.md §6 steps 3-4: log π_old and log π_ref (sharded
forwards), the critic's values (ppo), the rewards (waited for only now: they are scored while the
forwards run, see rollout_source.py), their normalisation, shaped rewards and advantages.

With asynchronous rollouts π_old is the policy that sampled each rollout, π_behav (algorithm.md
§9): rows of an older version take their log-probs from the copy of its weights (behaviour.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rpp_lightning import algorithms as A
from rpp_lightning.clients.rewards import RewardBatch
from rpp_lightning.config import AlgorithmConfig, RolloutConfig
from rpp_lightning.rl.behaviour import agreed_ages, behaviour_log_probs
from rpp_lightning.rl.critic import experience_values
from rpp_lightning.rl.distributed import any_rank, data_parallel_group
from rpp_lightning.rl.experience import Experience, RolloutBatch
from rpp_lightning.rl.faults import ServerFailure
from rpp_lightning.rl.models import Models
from rpp_lightning.rl.policy import experience_log_probs, response_log_probs
from rpp_lightning.rl.timing import timed
from rpp_lightning.rl.update import PolicyForward, single_forward_update
from rpp_lightning.rpc.failures import describe


@dataclass
class IterationExperience:
    """What one iteration's rollouts gave this rank."""

    exp: Experience
    rollouts: list  # the generation client's Rollouts, prompt-major
    rewards: RewardBatch  # before normalisation, per source
    entropy: Tensor  # (N, R) of π_old, per token
    advantage_stats: dict[str, float]  # before normalisation (algorithm.md §7)
    policy_forward: PolicyForward | None = None  # log π_old with its graph: see make()


class ExperienceMaker:
    """Turns one rank's rollouts into what the update needs, with the trainer's models."""

    def __init__(
        self,
        rollout: RolloutConfig,
        algorithm: AlgorithmConfig,
        estimator: A.AdvantageEstimatorSpec,
    ) -> None:
        self.rollout, self.algorithm, self.estimator = rollout, algorithm, estimator
        self.running_reward = A.RunningMeanStd()  # reward normalisation state (checkpointed)

    def make(
        self, batch: RolloutBatch, models: Models, timings: dict[str, float]
    ) -> IterationExperience:
        """Log-probs, values, rewards and advantages of `batch`. Every rank of the data-parallel
        group calls this (log-probs and normalisation are collective under FSDP2). Phase times
        land in `timings`. A reward call that failed past the failure policy raises ServerFailure
        on every rank alike, before anything is trained on this batch."""
        policy = models.policy
        device = next(policy.parameters()).device
        exp = batch.packed.to(device)
        with timed(timings, "logprobs"):
            entropy, forward = self._old_log_probs(exp, batch.rollouts, models)
            if models.reference is not None:
                exp.ref_log_probs, _ = experience_log_probs(
                    models.reference,
                    exp,
                    self.algorithm.micro_batch_size,
                    False,
                    self.rollout.temperature,
                )
        if models.critic is not None:
            with timed(timings, "values"):
                exp.values = experience_values(models.critic, exp, self.algorithm.micro_batch_size)
        with timed(timings, "score_wait"):
            error = batch.scoring.exception()
        if any_rank(error is not None, device):  # agreed before the next collective
            reason = describe(error) if error else "another rank's reward call failed"
            raise ServerFailure(f"scoring failed: {reason}")
        reward_batch = batch.scoring.result()
        cfg, group = self.algorithm, data_parallel_group()
        # on the device: batch and running normalisation all-reduce it, and NCCL takes no CPU
        # tensors
        rewards = torch.tensor(reward_batch.total, dtype=torch.float32, device=device)
        rewards = A.normalize_rewards(
            rewards, cfg.reward_normalization, self.running_reward, group=group
        )
        stats = self.advantages(exp, rewards)
        exp.rewards = A.clip_rewards(rewards, cfg.reward_clip)  # logged as reward/after_norm_clip
        return IterationExperience(exp, batch.rollouts, reward_batch, entropy, stats, forward)

    def _old_log_probs(
        self, exp: Experience, rollouts: list, models: Models
    ) -> tuple[Tensor, PolicyForward | None]:
        """Fill exp.old_log_probs: log π_old, the policy that sampled each rollout; return π_old's
        entropy and, when the update will be one step on this very batch, its forward."""
        policy, size = models.policy, self.algorithm.micro_batch_size
        temperature = self.rollout.temperature  # the distribution the servers sampled

        def old_log_probs(model: nn.Module, batch: Experience):
            # π_old's entropy comes with its forward at little cost: logged every step (§7)
            return experience_log_probs(model, batch, size, True, temperature)

        ages, present = [0] * len(rollouts), [0]
        if models.snapshots is not None:  # agreed by every rank: FSDP2 forwards are collective
            versions = [r.weights_version for r in rollouts]
            ages, present = agreed_ages(
                versions, models.version, models.snapshots, self.rollout.max_staleness,
                data_parallel_group(), exp.sequences.device,
            )  # fmt: skip
        if present != [0]:  # rollouts of older weights: π_old is the policy that sampled them
            exp.old_log_probs, entropy = behaviour_log_probs(
                policy, exp, ages, present, models.version, models.snapshots, old_log_probs
            )
            return entropy, None
        if single_forward_update(self.algorithm, len(exp)):
            # the update will be one step on this very batch: its forward, graph kept, is
            # log π_old too (update.single_forward_update)
            forward = response_log_probs(
                policy, exp.sequences, exp.attention_mask, exp.num_actions, True, temperature
            )
            exp.old_log_probs, entropy = (t.detach().float() for t in forward)
            return entropy, forward
        exp.old_log_probs, entropy = old_log_probs(policy, exp)
        return entropy, None

    def advantages(self, exp: Experience, rewards: Tensor) -> dict[str, float]:
        """Fill exp.advantages and exp.returns from the normalised, unclipped `rewards` (N,) with
        the configured estimator (algorithm.md §2-4); return the statistics before whitening."""
        cfg = self.algorithm
        if exp.ref_log_probs is None:  # kl_coef 0: no reference model
            kl = torch.zeros_like(exp.old_log_probs)
        else:
            kl = A.kl_estimate(exp.old_log_probs, exp.ref_log_probs, "k1")  # (N, R)
        out = A.compute_advantages(
            self.estimator.name,
            rewards,
            kl,
            exp.action_mask,
            n_samples_per_prompt=self.rollout.n_samples,
            kl_coef=cfg.kl_coef,
            gamma=cfg.gamma,
            lam=cfg.gae_lambda,
            values=exp.values,
            reward_clip=cfg.reward_clip,
            clip_order=cfg.reward_clip_order,
            group=data_parallel_group(),
        )
        exp.advantages, exp.returns = out.advantages, out.returns
        return out.stats
