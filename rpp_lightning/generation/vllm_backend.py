"""The GPU generation backend on vLLM (optional extra: `pip install rpp-lightning[vllm]`).

Written against vLLM's documented offline API (targeted: vLLM 0.10+, V1 engine), NOT run in this
repository's CI, which has no GPU and cannot install vllm (see the README). What it uses:

- `vllm.LLM(model=..., dtype=..., seed=..., logprobs_mode="raw_logprobs",
  worker_extension_cls=...)` -- `logprobs_mode` (vLLM >= 0.10.2) makes `logprobs` the model's own
  log-softmax before temperature / top-k / top-p, as generation.proto specifies.
- `LLM.generate([TokensPrompt(prompt_token_ids=...)], [SamplingParams(...)] , use_tqdm=False)`:
  one SamplingParams per row (n=1, per-row `seed`), so rows of different requests share a batch
  and `seed` means the same as in the transformers backend (a fixed seed -> fixed tokens; the
  token streams of the two backends differ).
- Weight updates without a restart follow vLLM's RLHF examples
  (`examples/offline_inference/rlhf_utils.py`): a worker extension class (`worker_extension_cls`)
  adds a method to every worker, called with `LLM.collective_rpc`, which calls
  `self.model_runner.model.load_weights(weights=[(name, tensor), ...])` with Hugging Face names.
  The tensors reach the worker processes (V1 runs them in separate processes) as one safetensors
  file in shared memory (/dev/shm): no pickle, and tensor-parallel workers each take their shard
  inside `load_weights`. Then `LLM.reset_prefix_cache()` drops KV blocks computed with the old
  weights.
The scheduler calls `generate` and `load_weights` from one thread, so a swap never overlaps
generation.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rpp_lightning.generation.backend import BackendInfo, SampleResult, SampleRow

log = logging.getLogger("rpp.generation")

_EXTENSION = f"{__name__}.WeightLoaderExtension"
_FLOATING = {"F64", "F32", "F16", "BF16"}  # served in the engine's dtype
_INTEGER = {"I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class VLLMConfig:
    """Engine settings; everything else is vLLM's default."""

    model: str
    """Local Hugging Face model directory."""
    dtype: str = "auto"
    """auto (the checkpoint's dtype, bf16 for fp32 checkpoints), bfloat16, float16, float32."""
    max_model_len: int | None = None
    """Context to reserve KV cache for; None = the model's."""
    gpu_memory_utilization: float = 0.85
    """Fraction of GPU memory vLLM may take (weights + KV cache)."""
    max_num_seqs: int = 64
    """Rows scheduled together."""
    tensor_parallel_size: int = 1


class WeightLoaderExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); runs inside the worker process."""

    def rpp_load_safetensors(self, path: str) -> int:
        from safetensors.torch import load_file

        tensors = load_file(path, device="cpu")
        # load_weights maps HF names onto vLLM's fused parameters and takes this rank's shard.
        self.model_runner.model.load_weights(weights=list(tensors.items()))
        torch.cuda.synchronize()
        return len(tensors)


class VLLMBackend:
    """Backend protocol over a `vllm.LLM` engine."""

    def __init__(self, config: VLLMConfig) -> None:
        from vllm import LLM  # optional dependency: imported only when this backend is chosen

        self.config = config
        self.llm = LLM(
            model=config.model,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_num_seqs=config.max_num_seqs,
            tensor_parallel_size=config.tensor_parallel_size,
            logprobs_mode="raw_logprobs",
            worker_extension_cls=_EXTENSION,
        )
        model_config = self.llm.llm_engine.model_config
        self.dtype: torch.dtype = model_config.dtype
        self._info = BackendInfo(
            model=config.model,
            backend="vllm",
            vocab_size=int(model_config.get_vocab_size()),
            max_model_len=int(model_config.max_model_len),
            eos_token_ids=_eos_token_ids(config.model),
        )
        self._shapes = _checkpoint_shapes(Path(config.model), self.dtype)

    def info(self) -> BackendInfo:
        return self._info

    def state_dict_shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        # vLLM fuses parameters (qkv_proj, gate_up_proj); updates use the checkpoint's names.
        return self._shapes

    def generate(self, rows: list[SampleRow]) -> list[SampleResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=row.prompt) for row in rows]
        params = [
            SamplingParams(
                n=1,
                temperature=row.temperature,
                top_p=row.top_p,
                top_k=row.top_k,  # 0 disables, as in vLLM
                max_tokens=row.max_new_tokens,
                stop_token_ids=list(row.stop_token_ids),
                seed=row.seed,
                logprobs=0,  # only the sampled token's log-probability
            )
            for row in rows
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for output in outputs:  # same order as `prompts`
            completion = output.outputs[0]
            token_ids = list(completion.token_ids)
            logprobs = [
                float(step[token].logprob)
                for token, step in zip(token_ids, completion.logprobs or [], strict=False)
            ]
            reason = "stop" if completion.finish_reason == "stop" else "length"
            results.append(SampleResult(token_ids, logprobs, reason))
        return results

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # RAM-backed where available
        with tempfile.TemporaryDirectory(prefix="rpp-weights-", dir=shm) as tmp:
            path = os.path.join(tmp, "update.safetensors")
            save_file({name: t.contiguous() for name, t in tensors.items()}, path)
            self.llm.collective_rpc("rpp_load_safetensors", args=(path,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights


def _checkpoint_shapes(directory: Path, dtype: torch.dtype):
    """Name -> (served dtype, shape) from the checkpoint's safetensors headers (no tensor read)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                piece = handle.get_slice(name)
                stored = piece.get_dtype()  # "F32", "BF16", "I64", ...
                served = dtype if stored in _FLOATING else _INTEGER.get(stored, torch.uint8)
                shapes[name] = (served, tuple(piece.get_shape()))
    if not shapes:
        raise ValueError(f"no *.safetensors weights in {directory}")
    return shapes


def _eos_token_ids(model: str) -> tuple[int, ...]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
