"""`rpp-train`: LightningCLI over the REINFORCE++ module and the prompt data module.

    rpp-train fit --config configs/tiny.yaml
    rpp-train fit --config configs/tiny.yaml --model.algorithm.advantage_estimator grpo
    rpp-train fit --config configs/tiny.yaml --trainer.devices 2 --trainer.strategy fsdp2
    rpp-train fit --config configs/tiny.yaml --trainer.devices 2 --trainer.strategy fsdp  # the same
    rpp-train fit --config configs/tiny.yaml --ckpt_path runs/tiny/.../last.ckpt   # resume

Every YAML key has a flag of the same dotted name; `rpp-train fit --help` lists them with their
docstrings, and `rpp-train fit --print_config` shows the resolved configuration. Launchers run
this module: `rpp-train`, `python -m rpp_lightning.cli`, `fabric run rpp_lightning/cli.py`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

# Before torch loads OpenMP (it reads this once): after each parallel region libgomp's threads
# spin for 300k iterations by default, holding cores that the generation and reward servers
# next to the trainer need (the embedded default on CPU). Measured with
# benchmarks/step_breakdown.py on 2 cores: the weight push ~2x faster, compute no slower.
# Set GOMP_SPINCOUNT yourself to override.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from rpp_lightning.rl.faults import EXIT_SERVER_FAILURE, TrainingInterrupted
from rpp_lightning.rpc.replicas import INTERRUPTED
from rpp_lightning.trainer.data import PromptDataModule
from rpp_lightning.trainer.module import ReinforcePP
from rpp_lightning.trainer.progress import default_progress_bar
from rpp_lightning.trainer.strategy import register as register_strategies
from rpp_lightning.trainer.strategy import rpp_strategy


def _tokenizer_dir(policy) -> str | None:
    return policy.tokenizer or policy.path


class RppCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenises prompts with the policy's tokenizer: one setting, not two.
        parser.link_arguments("model.policy", "data.tokenizer", compute_fn=_tokenizer_dir)

    def before_instantiate_classes(self) -> None:
        # `strategy: fsdp` means this project's FSDP2 (Lightning's FSDP1 refuses CPU and would
        # not shard the way configure_model does); mapped here, before any process starts, so
        # the saved config.yaml says what ran.
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).trainer
        typed = trainer.strategy
        try:
            trainer.strategy = rpp_strategy(typed)
        except ValueError as exc:
            raise SystemExit(f"rpp-train: error: {exc}") from None
        if trainer.strategy != typed:
            rank_zero_info(
                f"rpp-train: strategy {typed!r} runs as {trainer.strategy!r} (FSDP2Strategy: "
                "fully_shard over every process, CPU or CUDA)"
            )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the model's arguments with the ones saved in the checkpoint
        # (and only for single-file checkpoints, not sharded ones). A resumed run takes its
        # configuration from the command line and YAML: servers may have moved since, and
        # `max_iterations` is what one usually raises when resuming.
        return

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # Lightning's default bar counts an epoch's batches; ours stops at max_iterations.
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(kwargs.get("callbacks", trainer.get("callbacks")) or [])
        wants_bar = trainer.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, default_progress_bar()]
        return super().instantiate_trainer(**kwargs)


def cli_main(args: list[str] | None = None, run: bool = True) -> RppCLI:
    register_strategies()
    return RppCLI(
        ReinforcePP,
        PromptDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults={
            # our sampler already gives each rank its share and resumes mid-epoch
            "use_distributed_sampler": False,
            "num_sanity_val_steps": 0,
            "max_epochs": -1,  # stopping is model.rollout.max_iterations' job
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "rpp-train"},
    )


def _on_interrupt(signum, frame) -> None:
    INTERRUPTED.set()  # retries stop too (replicas.py), whatever the call was doing
    signal.default_int_handler(signum, frame)


def main() -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        cli_main()
    except TrainingInterrupted as exc:  # servers failed past the budget; a checkpoint is saved
        print(f"rpp-train: {exc}", file=sys.stderr, flush=True)
        return EXIT_SERVER_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
