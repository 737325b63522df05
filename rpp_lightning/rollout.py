"""One iteration's experience, algorithm.md §6 steps 1-4: generate → score → log π_old and
log π_ref → shaped rewards → advantages, for one rank's prompts.

Scoring runs in the background while the trainer computes the log-probs: neither needs the
rewards, and the reward servers are other processes (other machines, in a real deployment), so
their time hides behind the trainer's forwards. (On one small CPU machine the two compete for the
same cores instead: about neutral on the 2-core quickstart.) `time/score` is the call's own wall
time, `time/score_wait` what the trainer still waited for it afterwards.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rpp_lightning import algorithms as A
from rpp_lightning.behaviour import WeightSnapshots, agreed_ages, behaviour_log_probs
from rpp_lightning.config import AlgorithmConfig, RolloutConfig
from rpp_lightning.critic import experience_values
from rpp_lightning.data import PromptRow
from rpp_lightning.experience import Experience, pack_rollouts
from rpp_lightning.faults import ServerFailure, any_rank
from rpp_lightning.metrics import BusyClock, timed
from rpp_lightning.policy import experience_log_probs, response_log_probs
from rpp_lightning.replicas import describe
from rpp_lightning.rewards import RewardBatch
from rpp_lightning.servers import TrainerServers
from rpp_lightning.strategy import data_parallel_group
from rpp_lightning.update import PolicyForward, single_forward_update


@dataclass
class IterationExperience:
    """What one iteration's rollouts gave this rank."""

    exp: Experience
    rollouts: list  # the generation client's Rollouts, prompt-major
    rewards: RewardBatch  # before normalisation, per source
    entropy: Tensor  # (N, R) of π_old, per token
    advantage_stats: dict[str, float]  # before normalisation (algorithm.md §7)
    policy_forward: PolicyForward | None = None  # log π_old with its graph: see make()


@dataclass(frozen=True)
class RolloutStep:
    """Where one rank's iteration stands: what to sample with and which weights must serve it."""

    seed: int  # the sampling seed of the iteration
    weights_version: int  # the servers must serve this version (else StaleWeightsError); with
    # `at_least` in ExperienceMaker.generate (asynchronous rollouts), this one or a newer one
    prompt_offset: int  # this rank's first prompt in the global batch (seeds do not depend on
    # the number of ranks; see ResumableSampler)


class ExperienceMaker:
    """Turns one rank's prompts into advantages, with the servers and the trainer's models."""

    def __init__(
        self,
        servers: TrainerServers,
        rollout: RolloutConfig,
        algorithm: AlgorithmConfig,
        estimator: A.AdvantageEstimatorSpec,
    ) -> None:
        """`servers` must be started before `make` is called."""
        self.servers, self.rollout, self.algorithm = servers, rollout, algorithm
        self.estimator = estimator
        self.running_reward = A.RunningMeanStd()  # reward normalisation state (checkpointed)
        self._scoring: ThreadPoolExecutor | None = None
        self.generation_busy = BusyClock()  # when generation calls were in flight
        # the weights of the last max_staleness versions (behaviour.py); None: synchronous
        self.snapshots = WeightSnapshots() if rollout.max_staleness else None

    def make(
        self,
        rows: list[PromptRow],
        rollouts: list,
        policy: nn.Module,
        reference: nn.Module | None,
        timings: dict[str, float],
        critic: nn.Module | None = None,
        scoring: Future | None = None,
        weights_version: int = 0,
    ) -> IterationExperience:
        """Score `rollouts` (from `generate`) and compute what the update needs. Every rank of
        the data-parallel group calls this (log-probs and normalisation are collective under
        FSDP2). Phase times land in `timings`. `critic` (ppo only) gives the values next to the
        log-probs. `scoring`: the rollouts' scoring, when it started already (a batch asked for
        ahead). `weights_version`: the trainer's; log π_old is taken with the weights of each
        rollout's own version (behaviour.py) when that is an older one. A reward call that
        failed past the failure policy raises ServerFailure on every rank alike, before anything
        is trained on this batch."""
        if scoring is None:
            scoring = self.start_scoring(rows, rollouts, timings)
        sequences, attention_mask, action_mask = pack_rollouts(
            [row.prompt_ids for row in rows],
            [r.token_ids for r in rollouts],
            self.rollout.n_samples,
            self.servers.tokenizer.pad_token_id,
        )
        unscored = torch.zeros(len(sequences))  # the rewards arrive after the log-probs
        device = next(policy.parameters()).device
        exp = Experience(sequences, attention_mask, action_mask, unscored).to(device)
        forward = None
        with timed(timings, "logprobs"):
            size = self.algorithm.micro_batch_size
            temperature = self.rollout.temperature  # the distribution the servers sampled

            def old_log_probs(model: nn.Module, batch: Experience):
                # π_old's entropy comes with its forward at little cost: logged every step (§7)
                return experience_log_probs(model, batch, size, True, temperature)

            ages, present = [0] * len(rollouts), [0]
            if self.snapshots is not None:  # agreed by every rank: FSDP2 forwards are collective
                versions = [r.weights_version for r in rollouts]
                ages, present = agreed_ages(
                    versions, weights_version, self.snapshots, self.rollout.max_staleness,
                    data_parallel_group(), device,
                )  # fmt: skip
            if present != [0]:  # rollouts of older weights: π_old is the policy that sampled
                exp.old_log_probs, entropy = behaviour_log_probs(
                    policy, exp, ages, present, weights_version, self.snapshots, old_log_probs
                )
            elif single_forward_update(self.algorithm, len(exp)):
                # the update will be one step on this very batch: its forward, graph kept, is
                # log π_old too (update.single_forward_update)
                forward = response_log_probs(
                    policy, exp.sequences, exp.attention_mask, exp.num_actions, True, temperature
                )
                exp.old_log_probs, entropy = (t.detach().float() for t in forward)
            else:
                exp.old_log_probs, entropy = old_log_probs(policy, exp)
            if reference is not None:  # None when kl_coef is 0: there is no KL term
                exp.ref_log_probs, _ = experience_log_probs(
                    reference, exp, size, False, temperature
                )
        if critic is not None:
            with timed(timings, "values"):
                exp.values = experience_values(critic, exp, size)
        with timed(timings, "score_wait"):
            error = scoring.exception()
        if any_rank(error is not None, device):  # agreed before the next collective
            raise ServerFailure(describe(error) if error else "another rank's reward call failed")
        reward_batch = scoring.result()
        cfg, group = self.algorithm, data_parallel_group()
        # on the device: batch and running normalisation all-reduce it, and NCCL takes no CPU
        # tensors
        rewards = torch.tensor(reward_batch.total, dtype=torch.float32, device=device)
        rewards = A.normalize_rewards(
            rewards, cfg.reward_normalization, self.running_reward, group=group
        )
        stats = self.advantages(exp, rewards)
        exp.rewards = A.clip_rewards(rewards, cfg.reward_clip)  # logged as reward/after_norm_clip
        return IterationExperience(exp, rollouts, reward_batch, entropy, stats, forward)

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

    def close(self) -> None:
        """Stop the scoring thread (a call in flight ends when the servers stop)."""
        if self._scoring is not None:
            self._scoring.shutdown(wait=False, cancel_futures=True)
            self._scoring = None

    def generate(
        self, rows: list[PromptRow], step: RolloutStep, timings, at_least: bool = False
    ) -> list:
        """This rank's rollouts of `rows` from the generation servers, at step's version (or,
        `at_least`, at it or a newer one)."""
        version = step.weights_version
        with timed(timings, "generate"), self.generation_busy.busy():
            rollouts = self.servers.generation.generate(
                [row.prompt_ids for row in rows],
                self.rollout.sampling(step.seed),
                expected_version=None if at_least else version,
                prompt_offset=step.prompt_offset,
                min_version=version if at_least else None,
            )
        # server-side time: the rest of the wall time is transport
        timings["generate_server"] = self.servers.generation.last_server_s
        return rollouts

    def start_scoring(self, rows, rollouts, timings: dict[str, float]) -> Future:
        """Score `rollouts` on the reward servers in the background (times land in `timings`)."""

        def score() -> RewardBatch:
            start = time.perf_counter()
            rewards = self.servers.score(rows, rollouts, self.rollout.n_samples)
            timings["score"] = time.perf_counter() - start
            timings["score_server"] = self.servers.rewards.last_server_s
            return rewards

        if self._scoring is None:
            self._scoring = ThreadPoolExecutor(1, thread_name_prefix="rpp-score")
        return self._scoring.submit(score)
