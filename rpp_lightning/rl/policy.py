"""The policy and reference models: loading, the FSDP2 sharding plan, and token log-probs.

model = load_causal_lm(PolicyConfig(path="/models/qwen2.5-7b-instruct"))   # one process
model = load_sharded_causal_lm(config, mesh, device, mixed_precision=True)    # FSDP2 ranks
logp = response_log_probs(model, sequences, attention_mask, num_actions)  # (N, R)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from rpp_lightning.algorithms.losses import entropy_from_logits, log_probs_from_logits, position_ids
from rpp_lightning.config import PolicyConfig
from rpp_lightning.rl.experience import Experience, per_token_in_micro_batches


def load_causal_lm(config: PolicyConfig, reference: bool = False) -> nn.Module:
    """The policy (or, with `reference=True`, the frozen reference model) on CPU in fp32.

    From a local directory with `from_pretrained`, or from a transformers config dict with random
    weights seeded by `config.seed` (the reference then starts equal to the policy).
    """
    from transformers import AutoModelForCausalLM

    path = _weights_path(config, reference)
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = AutoModelForCausalLM.from_config(_hf_config(config), dtype=torch.float32)
    return _for_training(model, config, reference)


def save_causal_lm(config: PolicyConfig, directory: str) -> None:
    """Write the policy `config` describes to `directory` (`save_pretrained`): what a local
    generation server starts from when the policy comes from a transformers config."""
    load_causal_lm(config).save_pretrained(directory)


def _weights_path(config: PolicyConfig, reference: bool) -> str | None:
    config.validate()
    return config.reference_path if reference and config.reference_path else config.path


def _hf_config(config: PolicyConfig, path: str | None = None):
    from transformers import AutoConfig

    if path is not None:
        return AutoConfig.from_pretrained(path)
    settings = dict(config.config or {})
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def _for_training(model: nn.Module, config: PolicyConfig, reference: bool) -> nn.Module:
    if reference:
        model.requires_grad_(False)
        model.eval()
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False  # training forwards never reuse a KV cache
    return model


def load_sharded_causal_lm(
    config: PolicyConfig,
    mesh: DeviceMesh,
    device: torch.device,
    reference: bool = False,
    mixed_precision: bool = False,
) -> nn.Module:
    """The policy (or reference) sharded with FSDP2 over `mesh`, read from storage by rank 0 only
    (see `load_sharded`). Every rank of the default group must call this."""
    from transformers import AutoModelForCausalLM

    def empty() -> nn.Module:
        hf_config = _hf_config(config, _weights_path(config, reference))
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        return _for_training(model, config, reference)

    return load_sharded(
        lambda: load_causal_lm(config, reference), empty, mesh, device, mixed_precision
    )


def load_sharded(
    load_full: Callable[[], nn.Module],
    build_empty: Callable[[], nn.Module],
    mesh: DeviceMesh,
    device: torch.device,
    mixed_precision: bool = False,
) -> nn.Module:
    """A model sharded with FSDP2 over `mesh`: rank 0 calls `load_full` (reads the weights),
    every other rank calls `build_empty` under the meta device (no memory, no reads).

    After `shard_model`, rank 0's full weights are broadcast into every rank's shards, and the
    buffers are broadcast whole (non-persistent ones such as rotary frequencies are in no state
    dict). Host memory holds one full copy, on rank 0, instead of one per rank: 8 ranks of a 7B
    model in fp32 need 28 GB rather than 224 GB. Every rank of the default group must call this.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if mesh.size() != dist.get_world_size():
        raise ValueError("load_sharded needs every process in the data-parallel mesh")
    if dist.get_rank() == 0:
        model = load_full()
        full = model.state_dict()  # the full tensors stay referenced after sharding
    else:
        with torch.device("meta"):
            model = build_empty()
        full = {}
    shard_model(model, mesh, mixed_precision)
    if dist.get_rank() == 0:
        model.to(device)
    else:
        model.to_empty(device=device)  # storage for the broadcast to fill
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the unit FSDP2 shards and gathers one at a time."""
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module = model
        for name in attr.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard_model(model: nn.Module, mesh: DeviceMesh, mixed_precision: bool) -> nn.Module:
    """Apply FSDP2 (`fully_shard`) to each decoder layer, then to the root (LitGPT's plan).

    Sharding layer by layer lets FSDP all-gather one block's parameters at a time. With
    `mixed_precision`, parameters compute in bf16 while gradients reduce in fp32.
    Idempotent: `configure_model` may run more than once.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    mp_policy = MixedPrecisionPolicy()
    if mixed_precision:
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def response_log_probs(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    num_actions: int,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and optionally entropy) of the last `num_actions` tokens of each sequence,
    under the model's distribution at `temperature` (the one the responses were sampled from).

    sequences (N, L) are left-padded prompts followed by right-padded responses; the response
    occupies the last `num_actions` columns. Position ids skip the left padding so the model sees
    the same positions as the generation server did.
    """
    positions = position_ids(attention_mask)  # (N, L)
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=positions
    ).logits  # (N, L, V)
    # the token at position t is predicted by the logits at t-1
    logits = logits[:, -num_actions - 1 : -1]  # (N, R, V); log-softmax runs in fp32 inside
    if temperature != 1.0:
        logits = logits / temperature
    labels = sequences[:, -num_actions:]  # (N, R)
    log_probs = log_probs_from_logits(logits, labels)  # (N, R)
    entropy = entropy_from_logits(logits) if with_entropy else None  # (N, R)
    return log_probs, entropy


def experience_log_probs(
    model: nn.Module,
    exp: Experience,
    micro_batch_size: int,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (N, R) of every response token of `exp` at `temperature`, in micro-batches,
    without grad; with `with_entropy`, also the per-token entropy (N, R) of that distribution."""
    log_probs, entropy = per_token_in_micro_batches(
        exp,
        micro_batch_size,
        lambda micro: response_log_probs(
            model, micro.sequences, micro.attention_mask, micro.num_actions, with_entropy,
            temperature,
        ),
    )  # fmt: skip
    return log_probs, entropy


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Unsharded CPU copies of every parameter and buffer, for the weight push.

    Under FSDP2 every rank must call this (it all-gathers); only rank 0 gets the tensors, the
    others get an empty dict.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}


def export_hf(model: nn.Module, state: dict[str, Tensor], tokenizer, path: str) -> None:
    """Save `state` (a full state dict) with the model's config, plus the tokenizer, so that
    `from_pretrained(path)` (and a generation server) loads the trained policy."""
    model.config.use_cache = True  # inference default for whoever loads the export
    model.save_pretrained(path, state_dict=state, safe_serialization=True)
    model.config.use_cache = False
    tokenizer.save_pretrained(path)
