"""The default generation backend: a Hugging Face causal LM and our own sampling loop.

Why our own loop instead of `model.generate`: every row of a batch carries its own temperature,
top-k, top-p, stop tokens, token budget and random stream, so requests with different sampling
parameters share one batch, and a row's tokens do not depend on which rows it was batched with.

Per step, for a batch of B left-padded rows:
  1. logits (B, V) of the last position, from one forward with the KV cache;
  2. logprobs = log_softmax(raw logits) at the sampled token (the model's own distribution,
     before temperature / top-k / top-p, as generation.proto specifies);
  3. temperature, then top-k (ties at the k-th value are kept), then top-p (the smallest set of
     most likely tokens whose mass reaches top_p), renormalised;
  4. the token is drawn by inverse CDF over token ids 0..V-1 with the row's next uniform. The
     uniforms of a row are `torch.rand(max_new_tokens, dtype=float64)` from a CPU generator seeded
     with the row seed: a fixed recipe, so the same seed gives the same tokens on any batch.
Temperature 0 is greedy (argmax of the raw logits).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence

import torch

from rpp_lightning.algorithms.losses import position_ids
from rpp_lightning.generation.backend import BackendInfo, SampleResult, SampleRow

log = logging.getLogger("rpp.generation")


def resolve_device(device: str) -> torch.device:
    """Resolve "auto" to CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Resolve "auto" to bfloat16 on a GPU that supports it, else float32 (CPU bf16 is slow)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def row_uniforms(seed: int, count: int) -> torch.Tensor:
    """The `count` uniforms in [0, 1) that drive one row's sampling, float64 on CPU."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(count, generator=generator, dtype=torch.float64)


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Sampling probabilities (B, V) after temperature, top-k and top-p, each per row.

    logits (B, V) float32; temperature (B,) > 0; top_k (B,) long, 0 = off; top_p (B,) in (0, 1].
    """
    scaled = logits / temperature[:, None]  # (B, V)
    vocab = scaled.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # (B,)
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # (B, V)
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (B, V)
        drop_sorted = mass_before >= top_p[:, None]  # the most likely token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw (B,) over token ids from probs (B, V) and uniforms (B,) in [0, 1)."""
    cdf = probs.double().cumsum(-1)  # (B, V)
    target = (uniforms.to(cdf.device) * cdf[:, -1])[:, None]  # (B, 1): no renormalising needed
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp(max=probs.shape[-1] - 1)


class TransformersBackend:
    """A transformers causal LM with batched, per-row-seeded sampling and a KV cache."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto") -> None:
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_path = str(model_path)
        self.model = _load_model(AutoModelForCausalLM, model_path, self.dtype)
        self.model.to(self.device).eval()
        # transformers 5 renamed the cache argument `past_key_values` -> `cache`
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        config = self.model.config
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        self._info = BackendInfo(
            model=self.model_path,
            backend="transformers",
            vocab_size=int(config.vocab_size),
            max_model_len=int(getattr(config, "max_position_embeddings", 0) or 2048),
            eos_token_ids=tuple(int(i) for i in eos_ids),
            device=str(self.device),
        )
        self._pad_id = int(config.pad_token_id if config.pad_token_id is not None else 0)
        log.info("loaded %s on %s as %s", model_path, self.device, self.dtype)

    def info(self) -> BackendInfo:
        return self._info

    def state_dict_shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (t.dtype, tuple(t.shape)) for name, t in self.model.state_dict().items()}

    @torch.inference_mode()
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        # In place: no second copy of the model on the device. Safe because the scheduler
        # never runs this while a batch is generating.
        state = self.model.state_dict()
        for name, tensor in tensors.items():
            state[name].copy_(tensor, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def adopt_weights(self, updated: dict[str, torch.Tensor], complete: dict) -> bool:
        """Make the tensors of `complete` (views of a shared-memory region laid out like the
        state dict) the model's own storage: a pointer swap instead of a copy. CPU only. The
        tensors not in `updated` are first copied in from the current weights, so the region
        holds the whole model and the one that served before can be written next."""
        if self.device.type != "cpu":
            return False
        current = self.model.state_dict()
        done: set[int] = set()  # tied weights (one Parameter, two names) are adopted once
        for name in [*updated, *(n for n in complete if n not in updated)]:
            owner_name, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            param = owner._parameters.get(attr)
            key = id(param) if param is not None else id(owner._buffers.get(attr))
            if key in done:
                continue
            done.add(key)
            if name not in updated:
                complete[name].copy_(current[name])
            if param is not None:
                param.data = complete[name]
            else:
                owner._buffers[attr] = complete[name]
        return True

    @torch.inference_mode()
    def generate(
        self, rows: list[SampleRow], gone: Callable[[], Sequence[bool]] | None = None
    ) -> list[SampleResult]:
        B, device = len(rows), self.device
        steps = max(row.max_new_tokens for row in rows)
        lengths = [len(row.prompt) for row in rows]
        width = max(lengths)
        input_ids = torch.full((B, width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last token is at -1
            input_ids[i, width - lengths[i] :] = torch.tensor(row.prompt)
            mask[i, width - lengths[i] :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = position_ids(mask)  # (B, T): pads do not shift positions

        temperature = torch.tensor([r.temperature for r in rows], device=device)
        greedy = temperature == 0
        temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
        top_k = torch.tensor([r.top_k for r in rows], device=device)
        top_p = torch.tensor([r.top_p for r in rows], device=device)
        budget = torch.tensor([r.max_new_tokens for r in rows], device=device)
        stops = [tuple(r.stop_token_ids) + self._info.eos_token_ids for r in rows]
        stop_ids = torch.full((B, max(map(len, stops)) or 1), -1, dtype=torch.long)
        for i, ids in enumerate(stops):
            stop_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        stop_ids = stop_ids.to(device)  # (B, S), -1 = no stop token
        uniforms = torch.stack([row_uniforms(r.seed, steps) for r in rows])  # (B, steps)

        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        tokens, logprobs, stopped = [], [], []
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(steps):
            logits = out.logits[:, -1, :].float()  # (B, V)
            raw_logprobs = torch.log_softmax(logits, dim=-1)
            sampled = draw(filter_logits(logits, temperature, top_k, top_p), uniforms[:, step])
            token = torch.where(greedy, logits.argmax(-1), sampled)  # (B,)
            tokens.append(token)
            logprobs.append(raw_logprobs.gather(1, token[:, None]).squeeze(1))
            hit_stop = (stop_ids == token[:, None]).any(-1)
            stopped.append(hit_stop & ~done)
            done = done | hit_stop | (step + 1 >= budget)
            abandoned = gone() if gone is not None else ()
            if any(abandoned):  # nobody reads these rows: end them, as if they had stopped
                done = done | torch.tensor(abandoned, dtype=torch.bool, device=device)
            if step + 1 == steps or bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: _cache_of(out)},
            )
        return _collect(rows, tokens, logprobs, stopped)


def _load_model(auto_class, model_path: str, dtype: torch.dtype):
    import transformers

    # `torch_dtype` became `dtype` in transformers 4.56
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return auto_class.from_pretrained(model_path, **{key: dtype})


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _collect(rows, tokens, logprobs, stopped) -> list[SampleResult]:
    token_table = torch.stack(tokens, dim=1).cpu().tolist()  # (B, steps_run)
    logprob_table = torch.stack(logprobs, dim=1).cpu().tolist()
    stop_table = torch.stack(stopped, dim=1).cpu().tolist()
    results = []
    for i, row in enumerate(rows):
        end, reason = row.max_new_tokens, "length"
        for step, hit in enumerate(stop_table[i][: row.max_new_tokens]):
            if hit:
                end, reason = step + 1, "stop"
                break
        results.append(SampleResult(token_table[i][:end], logprob_table[i][:end], reason))
    return results
