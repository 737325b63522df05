"""The trainer's connections: generation and reward clients, and the servers it starts itself.

With `local: true` in the config, global rank 0 starts the servers as child processes on free
loopback ports (single-node runs) and broadcasts their addresses, so every rank talks to them.
Otherwise the addresses in the config point at separately deployed servers.

What the trainer asks of them lives with the part that asks: rollouts and their scoring in
rollout_source.py, weight pushes in weight_sync.py, greedy evaluation in evaluation.py.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace

import torch

from rpp_lightning.clients.generation import GenerationClient
from rpp_lightning.clients.local_servers import (
    ChildServer,
    generation_server_argv,
    reward_server_argv,
)
from rpp_lightning.clients.rewards import RewardClient
from rpp_lightning.config import GenerationEndpoint, PolicyConfig, RewardSource
from rpp_lightning.rl.distributed import Ranks
from rpp_lightning.rpc.failures import FailurePolicy

log = logging.getLogger("rpp.servers")


class TrainerServers:
    """Owns the tokenizer, the clients, and any child servers of one training run."""

    def __init__(
        self,
        policy: PolicyConfig,
        generation: GenerationEndpoint,
        rewards: list[RewardSource],
        failure_policy: FailurePolicy | None = None,
        save_initial_policy: Callable[[str], None] | None = None,
    ) -> None:
        """`save_initial_policy(directory)` writes the policy a local generation server starts
        from when `policy` has no `path` (a policy built from a config)."""
        if not rewards:
            raise ValueError("at least one reward source is required")
        self.save_initial_policy = save_initial_policy
        self.failure_policy = failure_policy or FailurePolicy()
        self.policy_config = policy
        self.generation_endpoint = generation
        self.reward_sources = list(rewards)
        self.children: list[ChildServer] = []
        self.tokenizer = None
        self.generation: GenerationClient | None = None
        self.rewards: RewardClient | None = None
        self.has_verifier = False
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _generation_model_dir(self) -> str:
        # A local server needs a model directory to start from; a policy built from a config
        # is saved once here (the trainer pushes its own weights before the first rollout).
        if self.policy_config.path is not None:
            return self.policy_config.path
        if self.save_initial_policy is None:
            raise ValueError("a local generation server needs policy.path or save_initial_policy")
        self._tmp = tempfile.TemporaryDirectory(prefix="rpp-init-policy-")
        self.save_initial_policy(self._tmp.name)
        self.tokenizer.save_pretrained(self._tmp.name)
        return self._tmp.name

    def _start_children(self) -> dict[str, list[str]]:
        started: dict[str, ChildServer] = {}
        if self.generation_endpoint.local:
            argv = generation_server_argv(
                self._generation_model_dir(), self.generation_endpoint.local_args
            )
            started["generation"] = ChildServer(argv, name="generation-server", wait=False)
        for source in self.reward_sources:
            if source.local:
                argv = reward_server_argv(source.local, source.local_args)
                name = f"reward-server:{source.name}"
                started[source.name] = ChildServer(argv, name=name, wait=False)
        self.children.extend(started.values())
        for child in started.values():  # they start side by side; each is waited for here
            child.wait_ready()
        return {name: [child.address] for name, child in started.items()}

    def start(self, ranks: Ranks) -> None:
        """Start local servers on rank 0, share their addresses, connect every rank's clients."""
        from transformers import AutoTokenizer  # slow to import: when first used, as elsewhere

        if self.generation is not None:
            return
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.policy_config.tokenizer or self.policy_config.path
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        wants_local = self.generation_endpoint.local or any(s.local for s in self.reward_sources)
        addresses: dict[str, list[str]] = {}
        if wants_local:
            error = None
            if ranks.global_rank == 0:
                try:
                    addresses = self._start_children()
                except Exception as exc:
                    error = str(exc)
            addresses, error = ranks.broadcast((addresses, error), src=0)
            if error:
                self.stop()
                raise RuntimeError(f"could not start local servers: {error}")
        if "generation" in addresses:
            self.generation_endpoint = replace(
                self.generation_endpoint, addresses=addresses["generation"]
            )
        self.reward_sources = [
            replace(s, addresses=addresses[s.name]) if s.name in addresses else s
            for s in self.reward_sources
        ]
        if not self.generation_endpoint.addresses:
            raise ValueError("generation.addresses is empty and generation.local is false")
        endpoint = self.generation_endpoint
        self.generation = GenerationClient(
            endpoint.addresses,
            channel=endpoint,
            timeout_s=endpoint.timeout_s,
            policy=self.failure_policy,
            weight_transport=endpoint.weight_transport,
        )
        # deployed servers may still be loading a large model: wait at least as long as for
        # one that failed mid-run
        self.generation.wait_until_ready(timeout_s=max(300.0, self.failure_policy.retry_budget_s))
        self.rewards = RewardClient(self.reward_sources, self.failure_policy)
        # With a verifier among the sources an empty response counts as a wrong answer in the
        # accuracy; without one, accuracy is undefined and is not logged.
        self.has_verifier = any(info.kind == "verifier" for info in self.rewards.info())

    def push_dtype(self, device_type: str) -> torch.dtype:
        """The dtype the generation servers serve (see GenerationEndpoint.push_dtype)."""
        name = self.generation_endpoint.push_dtype
        if name == "auto":
            return torch.bfloat16 if device_type == "cuda" else torch.float32
        return getattr(torch, name)

    def served_version(self) -> int:
        """Highest weights version any generation replica serves now."""
        return max(info.weights_version for info in self.generation.server_info())

    def stop(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        if self.generation is not None:
            self.generation.close()
        for child in self.children:
            child.stop()
        self.children.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
