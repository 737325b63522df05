"""Typed configuration of a training run. Each field's docstring is its `--help` text.

The LightningModule takes these dataclasses as constructor arguments, so LightningCLI (via
jsonargparse) turns them into YAML sections (`model.algorithm.kl_coef: 0.001`) and flags
(`--model.algorithm.kl_coef 0.001`). Each group validates itself and reports every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rpp_lightning.algorithms.advantages import EstimatorName
from rpp_lightning.rpc.channels import ChannelConfig


def _raise_all(group: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"invalid {group} configuration:\n  " + "\n  ".join(problems))


@dataclass
class PolicyConfig:
    """Where the policy (and the frozen reference model) come from."""

    path: str | None = None
    """Local Hugging Face model directory (`from_pretrained`). Also the reference model."""
    config: dict[str, Any] | None = None
    """Instead of `path`: a transformers config dict (with `model_type`), randomly initialised."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `path`."""
    reference_path: str | None = None
    """Reference model directory when it differs from `path` (default: same as the policy)."""
    seed: int = 0
    """Seed for random initialisation from `config`."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    mixed_precision: bool | None = None
    """Under FSDP2 (`--trainer.strategy fsdp2`): compute in bf16, keep fp32 master weights and
    reduce gradients in fp32. None: on with CUDA, off on CPU (where bf16 is slow; `true` there
    runs the same code path, as the tests do)."""

    def validate(self) -> None:
        problems = []
        if (self.path is None) == (self.config is None):
            problems.append("give exactly one of `path` and `config`")
        if self.config is not None and "model_type" not in self.config:
            problems.append("`config` needs a `model_type` (e.g. llama, qwen2)")
        if self.path is None and self.tokenizer is None:
            problems.append("`tokenizer` is required when the policy comes from `config`")
        for name in ("path", "tokenizer", "reference_path"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                # checked here: transformers would take a missing directory for a hub id
                problems.append(f"{name}: no such directory {value!r} (relative to {Path.cwd()})")
        _raise_all("policy", problems)


@dataclass
class AlgorithmConfig:
    """REINFORCE++ and its variants (docs/algorithm.md sections 1-5)."""

    advantage_estimator: EstimatorName = "reinforce_pp"
    """How advantages are estimated; also decides where the KL term goes (algorithm.md §4).
    `ppo` trains a critic (see `model.critic`) and estimates advantages by GAE."""
    kl_coef: float = 0.01
    """β: weight of the KL penalty (paper: 0.01 general chat, 0.001 math). 0 turns the KL term
    off: no reference model is loaded or run, and no KL is logged."""
    gamma: float = 1.0
    """Discount of token rewards."""
    gae_lambda: float = 0.95
    """λ of GAE (`ppo` only): 1 gives returns minus values, 0 one-step TD errors."""
    reward_clip: float = 10.0
    """Scalar rewards are clipped to [-reward_clip, reward_clip]."""
    reward_clip_order: Literal["clip_then_baseline", "baseline_then_clip"] = "clip_then_baseline"
    """With a group baseline (reinforce_pp_baseline, grpo, rloo): clip the raw rewards, then
    subtract the baseline (default: one outlier cannot move its siblings' advantages by more
    than clip/n), or OpenRLHF's order, baseline then clip (algorithm.md §2)."""
    reward_normalization: Literal["none", "batch", "running"] = "none"
    """Normalise scalar rewards before clipping."""
    clip_eps_low: float = 0.2
    """PPO clip: ratios below 1 - clip_eps_low are clipped."""
    clip_eps_high: float = 0.2
    """PPO clip: ratios above 1 + clip_eps_high are clipped."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens; None disables."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0 disables; computing entropy costs memory)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    mini_batch_size: int = 8
    """Rollouts (samples) per optimizer step, per rank."""
    micro_batch_size: int = 4
    """Rollouts per forward/backward, per rank (gradient accumulation inside a mini-batch)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""

    @property
    def uses_reference(self) -> bool:
        """Whether the frozen reference model is needed (for the KL term)."""
        return self.kl_coef > 0

    def validate(self) -> None:
        problems = []
        if self.kl_coef < 0:
            problems.append(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not 0 < self.gamma <= 1:
            problems.append(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.gae_lambda <= 1:
            problems.append(f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.reward_clip <= 0:
            problems.append(f"reward_clip must be > 0, got {self.reward_clip}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            problems.append(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.micro_batch_size < 1 or self.mini_batch_size % self.micro_batch_size:
            problems.append(
                f"mini_batch_size ({self.mini_batch_size}) must be a positive multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        _raise_all("algorithm", problems)


@dataclass
class RolloutConfig:
    """What each iteration samples (algorithm.md §6 step 1); prompts per step: data.batch_size."""

    n_samples: int = 4
    """Responses per prompt."""
    max_new_tokens: int = 256
    """Longest response."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs (π_old, π_ref, the loss) use the same one,
    so the policy gradient is taken for the distribution the rollouts came from."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k sampling (0 disables)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop token ids (the tokenizer's EOS always stops)."""
    max_iterations: int = 100
    """Training iterations (rollout → update → weight push); also sets the LR schedule length."""
    max_staleness: int = 0
    """0: each iteration samples its rollouts from the current weights, then updates (the
    synchronous loop). k ≥ 1: the rollouts of the next k iterations are sampled and scored while
    the trainer updates, by weights at most k versions old; their PPO ratio uses the log-probs
    of the weights that sampled them, recomputed by the trainer from a copy of each of the last
    k versions (k extra copies of the policy's parameters). algorithm.md §9."""

    def validate(self) -> None:
        problems = []
        if self.n_samples < 1:
            problems.append(f"n_samples must be >= 1, got {self.n_samples}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (RL samples), got {self.temperature}")
        if self.max_iterations < 1:
            problems.append(f"max_iterations must be >= 1, got {self.max_iterations}")
        if self.max_staleness < 0:
            problems.append(f"max_staleness must be >= 0, got {self.max_staleness}")
        _raise_all("rollout", problems)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay, stepped once per optimizer step."""

    lr: float = 1e-6
    """Peak learning rate (paper: 5e-7 for 7-8B models)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_ratio: float = 0.03
    """Fraction of optimizer steps spent warming up linearly from 0."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr × min_lr_ratio."""
    eps: float = 1e-8
    """AdamW epsilon."""


@dataclass
class CriticConfig:
    """The value model of `advantage_estimator: ppo` (built for no other estimator)."""

    path: str | None = None
    """Local model directory to start the critic from, e.g. a reward model
    (`AutoModelForSequenceClassification` with one label: its score head becomes the value
    head). None: the policy's own weights, with a fresh value head."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6))
    """The critic's own AdamW and schedule (stepped once per iteration, like the policy's)."""
    value_clip: float | None = 0.2
    """Clipped value loss: a new value may move at most this far from the rollout's value
    before the unclipped error takes over (PPO's max of the two); None: plain squared error."""
    value_loss_coef: float = 1.0
    """Weight of the value loss 0.5·(V − return)². The critic has its own optimizer, so this
    scales its gradient before `max_grad_norm` clipping."""
    warmup_iterations: int = 0
    """Iterations at the start that train only the critic (the policy and its weights stay)."""

    def validate(self) -> None:
        problems = []
        if self.path is not None and not Path(self.path).is_dir():
            problems.append(f"path: no such directory {self.path!r} (relative to {Path.cwd()})")
        if self.value_clip is not None and self.value_clip <= 0:
            problems.append(f"value_clip must be > 0 or null, got {self.value_clip}")
        if self.value_loss_coef <= 0:
            problems.append(f"value_loss_coef must be > 0, got {self.value_loss_coef}")
        if self.warmup_iterations < 0:
            problems.append(f"warmup_iterations must be >= 0, got {self.warmup_iterations}")
        _raise_all("critic", problems)


@dataclass
class RewardSource(ChannelConfig):
    """One reward server (or several replicas of one: batches are spread over them).

    The connection fields (addresses, timeout_s, TLS, token) are ChannelConfig's.
    """

    name: str = "reward"
    """Metric name of this source (`reward/<name>`)."""
    weight: float = 1.0
    """Weight in the combined reward."""
    route_column: str | None = None
    """Dataset column used for routing; None: every sample goes to this source."""
    route_values: list[str] = field(default_factory=list)
    """Samples whose `route_column` is one of these go to this source."""
    local: str | None = None
    """Start this reward server here, on a free loopback port: "math", "preference", or a user
    verifier as "module:Class" (the `rpp-reward-server --verifier` argument)."""
    local_args: list[str] = field(default_factory=list)
    """Extra CLI arguments for a local server (e.g. ["--model", "path"])."""


@dataclass
class GenerationEndpoint(ChannelConfig):
    """The generation servers; the connection fields are ChannelConfig's."""

    timeout_s: float = 600.0
    """Deadline of one Generate or UpdateWeights call (a whole rollout batch)."""

    local: bool = False
    """Start one transformers generation server as a child process on a free loopback port."""
    local_args: list[str] = field(default_factory=list)
    """Extra CLI arguments for the local generation server."""
    push_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of pushed weights; servers refuse any other than the one they serve. "auto" is
    what `rpp-generation-server --dtype auto` serves: bfloat16 on CUDA, float32 on CPU."""
    weight_transport: Literal["auto", "grpc", "shm", "cuda_ipc", "collective"] = "auto"
    """How pushed weights travel (gRPC always carries the control messages): "grpc" streams
    them; "shm" writes them into the server's shared memory (same host); "cuda_ipc" shares CUDA
    tensors by handle (same host, both on CUDA); "collective" broadcasts them in a gloo/NCCL
    group the server rendezvouses (any host); "auto" takes cuda_ipc or shm for a server on
    this host, else grpc. A replica that cannot take the one chosen is pushed by grpc (logged)."""
