"""The trainer's parts on configs/tiny.yaml, without the LightningModule: its configs, prompt
rows, and its servers (a local transformers generation server and a math-verify reward server,
started as child processes), for the tests of one part at a time."""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
import yaml
from conftest import ROOT

from rpp_lightning.clients.local_servers import ChildServer
from rpp_lightning.config import (
    AlgorithmConfig,
    GenerationEndpoint,
    PolicyConfig,
    RewardSource,
    RolloutConfig,
)
from rpp_lightning.rl.distributed import SingleProcess
from rpp_lightning.rl.experience import PromptRow
from rpp_lightning.rl.policy import save_causal_lm
from rpp_lightning.rl.trainer_servers import TrainerServers
from rpp_lightning.trainer.data import PromptDataModule

TOKENIZER = str(ROOT / "assets" / "char_tokenizer")
CPU = torch.device("cpu")
ONE_PROCESS = SingleProcess(CPU)  # rank 0 of 1, no Lightning: the parts need only `Ranks`


def tiny_model_settings() -> dict[str, Any]:
    """configs/tiny.yaml's `model:` section."""
    return yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]


def tiny_policy() -> PolicyConfig:
    return PolicyConfig(**{**tiny_model_settings()["policy"], "tokenizer": TOKENIZER})


def tiny_algorithm(**changes: Any) -> AlgorithmConfig:
    return AlgorithmConfig(**{**tiny_model_settings()["algorithm"], **changes})


def tiny_rollout(**changes: Any) -> RolloutConfig:
    return RolloutConfig(**{**tiny_model_settings()["rollout"], **changes})


def start_tiny_servers(policy: PolicyConfig) -> TrainerServers:
    """tiny.yaml's local generation and math servers, started, with connected clients."""
    settings = tiny_model_settings()
    servers = TrainerServers(
        policy,
        GenerationEndpoint(**settings["generation"]),
        [RewardSource(**source) for source in settings["rewards"]],
        save_initial_policy=functools.partial(save_causal_lm, policy),
    )
    servers.start(ONE_PROCESS)
    return servers


def prompt_rows(count: int = 4) -> list[PromptRow]:
    """The first `count` committed arithmetic training prompts, tokenised as the trainer does."""
    data = ROOT / "data" / "arithmetic"
    module = PromptDataModule(
        str(data / "train.jsonl"), str(data / "val.jsonl"), tokenizer=TOKENIZER, batch_size=4
    )
    module.setup("fit")
    return module.train_rows[:count]


def restart_generation_server(servers: TrainerServers) -> None:
    """Stop the generation server and start a fresh one (at weights version 0) on its port."""
    old = next(c for c in servers.children if c.name == "generation-server")
    port = old.address.rsplit(":", 1)[1]
    old.stop()
    servers.children.remove(old)
    argv = [*old.argv]
    argv[argv.index("--port") + 1] = port
    servers.children.append(ChildServer(argv, name="generation-server"))


class GatedAhead:
    """Wraps a generation client's `generate`: the calls for batches asked for ahead (the ones
    with `min_version`) wait until `opened` is set, and `done` is set when one returns. Lets a
    test order the background's calls against its own pushes and restarts."""

    def __init__(self, client) -> None:
        self.client, self._generate = client, client.generate
        self.opened, self.done = threading.Event(), threading.Event()
        self.opened.set()
        client.generate = self

    def __call__(self, *args, min_version: int | None = None, **kwargs):
        ahead = min_version is not None
        if ahead:
            assert self.opened.wait(120), "the gate was never opened"
        try:
            return self._generate(*args, min_version=min_version, **kwargs)
        finally:
            if ahead:
                self.done.set()

    def remove(self) -> None:
        del self.client.generate  # the instance attribute: the method shows again
