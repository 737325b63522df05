"""What a generation backend must do, and the per-sample types shared by every backend.

The servicer validates requests and the scheduler batches them; a backend only turns a batch of
independent sample rows into completions and swaps weights in. Two backends implement this
protocol: `transformers_backend.TransformersBackend` (CPU and CUDA) and
`vllm_backend.VLLMBackend` (GPU, or CPU with vLLM's CPU build). Both run on the scheduler's one
thread, so neither has to be thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class BackendInfo:
    """Static facts about the loaded model (GetInfo reports them)."""

    model: str
    backend: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    max_temperature: float | None = None
    """Highest temperature the engine samples at (None: no limit); higher is INVALID_ARGUMENT."""
    device: str = "cpu"
    """Where the weights live ("cpu", "cuda", "cuda:1"): which weight transports fit."""
    whole_model_updates: bool = False
    """True when a weight update must carry every tensor (an engine whose fused layers are
    rebuilt from what they are given); a partial one is INVALID_ARGUMENT."""


@dataclass
class SampleRow:
    """One sample to draw: a prompt and its own sampling parameters and seed.

    A request for n samples of p prompts becomes p * n rows; rows of different requests are
    batched together, which is why every parameter is per row.
    """

    prompt: list[int]
    max_new_tokens: int
    seed: int
    """Seed of this row's own random stream (see `seeds.row_seed`)."""
    temperature: float = 1.0
    """0 selects greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after any of these (the model's EOS ids are added by the backend)."""


@dataclass
class SampleResult:
    """The completion of one SampleRow."""

    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    """log_softmax of the model's raw logits at each sampled token (before temperature etc.)."""
    finish_reason: str = "length"
    """"stop" (a stop or EOS token ended it; the token is included) or "length"."""


class Backend(Protocol):
    """A model that samples rows and takes new weights. Called from one thread only."""

    def info(self) -> BackendInfo:
        """The loaded model's static description."""
        ...

    def state_dict_shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every tensor an update may replace."""
        ...

    def generate(
        self, rows: list[SampleRow], gone: Callable[[], Sequence[bool]] | None = None
    ) -> list[SampleResult]:
        """Sample every row (one result per row, same order) with the current weights.

        `gone()` says, per row, whether its caller has gone away. A backend that can look at it
        between decode steps stops working on those rows (their results are thrown away) and
        returns as soon as no row is left whose caller still waits."""
        ...

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy already-validated tensors (CPU, matching dtype and shape) into the model."""
        ...


def adopt_weights(backend: Backend, updated: dict[str, torch.Tensor], complete: dict) -> bool:
    """Let a backend that can take `complete` (every tensor of its state dict, `updated` among
    them) as its own storage do so, instead of copying; False when it cannot (then the caller
    copies with `load_weights`). Shared-memory updates use this (see weight_transport.shm)."""
    adopt = getattr(backend, "adopt_weights", None)
    return bool(adopt is not None and adopt(updated, complete))
