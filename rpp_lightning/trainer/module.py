"""REINFORCE++ as a LightningModule: one training step = one iteration of algorithm.md §6.

    rollouts (scored on the reward servers in the background) → log π_old, log π_ref (sharded)
    → shaped rewards, advantages → PPO-clip updates → push the new weights as version v+1

It holds its parts, plain objects built with what they need and each tested alone:

    servers          TrainerServers   the tokenizer, the clients, the servers started here
    weight_sync      WeightSync       the version served; pushes; copies of older weights
    rollout_source   RolloutSource    each iteration's rollouts (sampled now or asked for
                                      ahead), their scoring, generation's fault handling
    experience       ExperienceMaker  log-probs, values, reward normalisation, advantages
    evaluator        Evaluator        greedy held-out evaluation
    policy_export    PolicyExport     the Hugging Face export, at the end or on SIGUSR1

and owns what is Lightning's: hooks, optimizers and the update, checkpoints, logging, and the
stop on a server failure (rl/faults.py). The parts live in rpp_lightning/rl/ and know nothing of
Lightning; the math lives in `rpp_lightning.algorithms`.
"""

from __future__ import annotations

import functools
import logging
import random
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from rpp_lightning import algorithms as A
from rpp_lightning.clients.rewards import check_routes
from rpp_lightning.config import (
    AlgorithmConfig,
    CriticConfig,
    GenerationEndpoint,
    OptimConfig,
    PolicyConfig,
    RewardSource,
    RolloutConfig,
)
from rpp_lightning.rl.distributed import data_parallel_group
from rpp_lightning.rl.evaluation import Evaluator, accuracy, summed_over_ranks
from rpp_lightning.rl.experience import PromptRow
from rpp_lightning.rl.experience_maker import ExperienceMaker, IterationExperience
from rpp_lightning.rl.faults import ServerFailure
from rpp_lightning.rl.metrics import (
    iteration_metrics,
    reduce_metrics,
    staleness_metrics,
    update_metrics,
)
from rpp_lightning.rl.models import Models, leave_reference_out_of_checkpoints, load_models
from rpp_lightning.rl.policy import save_causal_lm
from rpp_lightning.rl.rollout_source import RolloutSource
from rpp_lightning.rl.timing import timed
from rpp_lightning.rl.trainer_servers import TrainerServers
from rpp_lightning.rl.update import (
    PolicyUpdateConfig,
    build_optimizer,
    check_same_rows_on_every_rank,
    critic_update,
    policy_update,
)
from rpp_lightning.rl.weight_sync import WeightSync
from rpp_lightning.rpc.failures import FailurePolicy
from rpp_lightning.trainer.checkpoints import stop_for_server_failure
from rpp_lightning.trainer.data import PromptDataModule
from rpp_lightning.trainer.export import PolicyExport

log = logging.getLogger("rpp.train")
PROGRESS_BAR_KEYS = ("reward", "accuracy", "kl", "response_length")

# Warnings about what this module does on purpose, printed on every run; matched narrowly.
for _intended in (
    r"Found \d+ module\(s\) in eval mode",  # the frozen reference model
    r"You have overridden `transfer_batch_to_device`",  # see transfer_batch_to_device below
    r"Using ModelCheckpoint with manual optimization",  # IterationCheckpoint saves after them
    r"Detected an existing checkpoint in .*last\.ckpt",  # ModelCheckpoint(save_last) rewrites it
):
    warnings.filterwarnings("ignore", message=_intended)


class ReinforcePP(pl.LightningModule):
    """Trains a causal LM with REINFORCE++ against remote generation and reward servers."""

    def __init__(
        self,
        policy: PolicyConfig,
        generation: GenerationEndpoint,
        rewards: list[RewardSource],
        algorithm: AlgorithmConfig | None = None,
        rollout: RolloutConfig | None = None,
        optim: OptimConfig | None = None,
        critic: CriticConfig | None = None,
        failure_policy: FailurePolicy | None = None,
        eval_max_new_tokens: int | None = None,
        evaluate_before_after: bool = False,
        export_dir: str | None = "auto",
        seed: int = 0,
    ) -> None:
        """
        Args:
            policy: the policy model (also the frozen reference unless reference_path is set).
            generation: the generation servers (or `local: true` to start one here).
            rewards: the reward sources, combined by weight.
            algorithm: REINFORCE++ settings (estimator, KL, clipping, epochs, batch sizes).
            rollout: what each iteration samples, and how many iterations to run.
            optim: optimizer and learning-rate schedule.
            critic: the value model of `advantage_estimator: ppo` (defaults apply when unset);
                ignored, and never built, for the critic-free estimators.
            failure_policy: how long to retry servers that fail before checkpointing and
                stopping (faults.py).
            eval_max_new_tokens: response length for held-out evaluation (default: rollout's).
            evaluate_before_after: evaluate on the held-out prompts before the first and after
                the last iteration, and print "held-out accuracy X% → Y%".
            export_dir: where to write the trained policy in Hugging Face format
                (`save_pretrained` + tokenizer) at the end; "auto": `<log dir>/hf_export`;
                None: no export at the end. On request, `kill -USR1 <rank 0 pid>` exports
                after the current iteration to `<log dir>/hf_export_iter<N>`.
            seed: seed of sampling and mini-batch shuffles.
        """
        super().__init__()
        self.automatic_optimization = False  # several optimizer steps per rollout batch
        self.algorithm = algorithm or AlgorithmConfig()
        self.rollout = rollout or RolloutConfig()
        self.optim = optim or OptimConfig()
        policy.validate()
        self.algorithm.validate()
        self.rollout.validate()
        self.estimator = A.get_estimator(self.algorithm.advantage_estimator)
        if self.rollout.n_samples < self.estimator.min_samples_per_prompt:
            raise ValueError(
                f"advantage_estimator {self.estimator.name!r} needs n_samples >= "
                f"{self.estimator.min_samples_per_prompt}, got {self.rollout.n_samples}"
            )
        self.policy_config, self.seed = policy, seed
        self.critic_config: CriticConfig | None = None
        if self.estimator.needs_values:
            self.critic_config = critic or CriticConfig()
            self.critic_config.validate()
        self.eval_max_new_tokens = eval_max_new_tokens or self.rollout.max_new_tokens
        self.evaluate_before_after = evaluate_before_after
        self.policy_export = PolicyExport(export_dir)
        self.accuracy_before: float | None = None
        self.accuracy_after: float | None = None
        self.save_hyperparameters()
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.critic: torch.nn.Module | None = None  # ppo only
        self.failure_policy = failure_policy or FailurePolicy()
        self.failure_policy.validate()
        save_initial = functools.partial(save_causal_lm, policy)
        self.servers = TrainerServers(
            policy, generation, rewards, self.failure_policy, save_initial
        )
        self.weight_sync = WeightSync(self.servers, self.rollout.max_staleness)
        self.experience = ExperienceMaker(self.rollout, self.algorithm, self.estimator)
        self.evaluator = Evaluator(self.servers, self.eval_max_new_tokens)
        self.rollout_source: RolloutSource | None = None  # built once the policy exists
        self.iteration = 0
        self._val_sums: torch.Tensor | None = None
        self._previous_step_start: float | None = None
        leave_reference_out_of_checkpoints(self)

    # ---- set-up -----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule  # set up already: refuse bad rows before any server starts
        if isinstance(data, PromptDataModule):
            check_routes(self.servers.reward_sources, data.train_rows, data.hparams.train_path)
            check_routes(self.servers.reward_sources, data.val_rows, "held-out prompts")
        elif self.rollout.max_staleness:
            raise ValueError(
                "rollout.max_staleness >= 1 asks for the batches of later iterations ahead, "
                "which needs rpp_lightning.trainer.data.PromptDataModule as the datamodule"
            )
        self.servers.start(self.trainer.strategy)
        self.weight_sync.connect(self.trainer.strategy)

    def configure_model(self) -> None:
        if self.policy is not None:  # configure_model may run once per stage
            return
        mesh = self.device_mesh  # FSDP2's, or None in one process
        device = self.trainer.strategy.root_device if mesh is not None else None
        self.policy, self.reference, self.critic = load_models(
            self.policy_config, self.algorithm.uses_reference, self.critic_config, mesh, device
        )

    def configure_optimizers(self):
        iterations = self.rollout.max_iterations
        built = [build_optimizer(self.policy, self.optim, iterations)]
        if self.critic is not None:  # its own AdamW, learning rate and schedule
            built.append(build_optimizer(self.critic, self.critic_config.optim, iterations))
        optimizers = [opt for opt, _ in built]
        return optimizers, [{"scheduler": sched, "interval": "step"} for _, sched in built]

    def _optimizers_and_schedulers(self) -> tuple[list, list]:
        opts, scheds = self.optimizers(), self.lr_schedulers()
        as_list = lambda x: x if isinstance(x, list) else [x]  # noqa: E731
        return as_list(opts), as_list(scheds)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # Prompt rows hold token-id lists that become device tensors later; Lightning's default
        # walks every field of every row for nothing (~1 ms a tiny-config step, profiled).
        return batch

    def on_train_start(self) -> None:
        self.policy_export.listen_for_signal(self.global_rank)  # kill -USR1: export
        if self.rollout_source is None:  # the policy exists now: a re-push can gather it
            data = self.trainer.datamodule
            self.rollout_source = RolloutSource(
                self.servers, self.rollout, self.seed, self.global_rank, self.device,
                push_again=functools.partial(self.weight_sync.push_again, self.policy),
                batch_of=data.train_batch if self.rollout.max_staleness else None,
            )  # fmt: skip
        self.weight_sync.ensure_synced(self.policy)
        if self.evaluate_before_after and self.accuracy_before is None:
            self.accuracy_before = self.evaluate()

    # ---- held-out evaluation (evaluation.py) ------------------------------------------------

    def evaluate(self) -> float | None:
        """Held-out accuracy of the current policy (outside Lightning's validation loop)."""
        self.weight_sync.ensure_synced(self.policy)
        batches = self.trainer.datamodule.val_dataloader()
        return accuracy(self.evaluator.sums(batches, self.weight_sync.version, self.device))

    def on_validation_start(self) -> None:
        self.weight_sync.ensure_synced(self.policy)
        self._previous_step_start = None  # time/previous_iteration leaves evaluation out

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: list[PromptRow], batch_idx: int) -> None:
        self._val_sums += self.evaluator.batch_sums(batch, self.weight_sync.version, self.device)

    def on_validation_epoch_end(self) -> None:
        reward_sum, correct, verified, samples = summed_over_ranks(self._val_sums).tolist()
        # the sums are the same on every rank now; sync_dist only keeps Lightning's epoch-level
        # bookkeeping consistent across ranks
        self.log("val/reward", reward_sum / max(samples, 1), batch_size=1, sync_dist=True)
        if verified:
            self.log(
                "val/accuracy", correct / verified, prog_bar=True, batch_size=1, sync_dist=True
            )

    # ---- one iteration ----------------------------------------------------------------------

    def _update(self, made: IterationExperience) -> tuple[list, list]:
        """The policy's and (ppo) the critic's optimizer steps on this iteration's batch."""
        exp = made.exp
        group = data_parallel_group()
        world = dist.get_world_size(group) if group is not None else 1
        seed = self.seed + self.iteration * world + self.global_rank
        check_same_rows_on_every_rank(len(exp), group, self.device)
        optimizers, _ = self._optimizers_and_schedulers()
        critic_steps = []
        if self.critic is not None:  # the same mini-batches as the policy (same shuffle seed)
            # the bare optimizer: Lightning's global step (max_steps, every_n_train_steps) keeps
            # counting policy steps only, as with the critic-free estimators
            critic_steps = critic_update(
                self.critic, optimizers[1].optimizer, exp, self.algorithm, self.critic_config,
                self.manual_backward, torch.Generator().manual_seed(seed), group,
            )  # fmt: skip
        if self._critic_warming_up():
            return [], critic_steps
        steps = policy_update(
            self.policy,
            optimizers[0],
            exp,
            PolicyUpdateConfig(self.algorithm, self.estimator, self.rollout.temperature),
            self.manual_backward,
            torch.Generator().manual_seed(seed),
            group,
            made.policy_forward,
        )
        return steps, critic_steps

    def _critic_warming_up(self) -> bool:
        config = self.critic_config
        return config is not None and self.iteration < config.warmup_iterations

    def training_step(self, batch: list[PromptRow], batch_idx: int) -> None:
        timings, step_start = self._start_timing()
        try:
            got = self.rollout_source.get(self.iteration, batch, self.weight_sync.version, timings)
            made = self.experience.make(got, self._models(), timings)
        except ServerFailure as exc:  # every rank raised it: nothing trained on this batch
            stop_for_server_failure(self.trainer, self.iteration, str(exc))
        trained_by = self.weight_sync.version  # the version the update starts from
        with timed(timings, "update"):
            if not self._critic_warming_up():
                self.weight_sync.keep_before_update(self.policy)
            steps, critic_steps = self._update(made)
        _, schedulers = self._optimizers_and_schedulers()
        for scheduler in schedulers:
            scheduler.step()
        if steps:  # a critic warm-up iteration leaves the policy as it was: nothing to push
            with timed(timings, "weight_sync"):
                self.weight_sync.push_after_update(self.policy)
        self.weight_sync.forget_out_of_reach()
        step_end = time.perf_counter()
        timings["step"] = step_end - step_start
        timings["generation_idle"] = self.rollout_source.generation_idle(step_start, step_end)
        timings.update({k: v for k, v in got.background.items() if k not in timings})
        metrics = iteration_metrics(made, steps, timings, self.rollout.max_new_tokens)
        metrics.update(update_metrics(critic_steps))
        metrics.update(staleness_metrics(got.rollouts, trained_by, got.refused))
        metrics["weights_version"] = float(self.weight_sync.version)
        metrics["lr"] = schedulers[0].get_last_lr()[0]
        self._log_metrics(metrics)
        self._end_iteration()

    def _start_timing(self) -> tuple[dict[str, float], float]:
        """This iteration's phase times, with the whole previous iteration (its logging and
        Lightning's loop included), and the time it started."""
        timings: dict[str, float] = {}
        step_start = time.perf_counter()
        if self._previous_step_start is not None:
            timings["previous_iteration"] = step_start - self._previous_step_start
        self._previous_step_start = step_start
        return timings, step_start

    def _models(self) -> Models:
        weights = self.weight_sync
        return Models(self.policy, weights.version, self.reference, self.critic, weights.snapshots)

    def _end_iteration(self) -> None:
        if self._is_last_iteration():
            self.trainer.should_stop = True
        self.iteration += 1
        tokenizer = self.servers.tokenizer
        self.policy_export.after_iteration(self.trainer, self.policy, tokenizer, self.iteration)

    def _log_metrics(self, metrics: dict[str, float | None]) -> None:
        """The progress bar's keys through `self.log`, every key straight to the loggers.

        `self.log` costs about 0.3 ms a key: 29 keys took 8 ms of a ~55 ms tiny-config
        iteration (profiled); the loggers take the whole dict in one call each.
        """
        reduced = reduce_metrics(metrics, data_parallel_group(), self.device)
        shown = {k: reduced[k] for k in PROGRESS_BAR_KEYS if k in reduced}
        self.log_dict(shown, prog_bar=True, logger=False, batch_size=1, rank_zero_only=True)
        every = self.trainer.log_every_n_steps
        due = every > 0 and ((self.iteration + 1) % every == 0 or self._is_last_iteration())
        if due and self.global_rank == 0:
            for logger in self.loggers:  # at the step Lightning would use: the iteration index
                logger.log_metrics(reduced, step=self.iteration)
                logger.save()

    def _is_last_iteration(self) -> bool:
        return self.iteration + 1 >= self.rollout.max_iterations

    def on_train_end(self) -> None:
        if self.evaluate_before_after:
            self.accuracy_after = self.evaluate()
            if self.global_rank == 0 and self.accuracy_after is not None:
                print(
                    f"held-out accuracy {100 * (self.accuracy_before or 0):.1f}% → "
                    f"{100 * self.accuracy_after:.1f}%",
                    flush=True,
                )
        self.policy_export.at_end(self.trainer, self.policy, self.servers.tokenizer)

    def export(self, path: str) -> None:
        """Write the policy in Hugging Face format (every rank must call this under FSDP)."""
        self.policy_export.export(self.trainer, self.policy, self.servers.tokenizer, path)

    # ---- state ------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rpp"] = {
            "weights_version": self.weight_sync.version,
            "iteration": self.iteration,
            "accuracy_before": self.accuracy_before,
            "running_reward": self.experience.running_reward.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rpp")
        if state is None:
            return
        self.weight_sync.restore(state["weights_version"])  # pushed again before it is used
        self.iteration = state["iteration"]
        self.accuracy_before = state.get("accuracy_before")
        self.experience.running_reward.load_state_dict(state["running_reward"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        # nothing was asked for ahead by this process, and batches asked for before the save
        # are not in the checkpoint: the first iteration after a resume generates synchronously

    def teardown(self, stage: str) -> None:
        if self.rollout_source is not None:
            self.rollout_source.close()
            self.rollout_source = None
        self.servers.stop()
