"""The trainer's models: the policy, the frozen reference (for the KL term) and, with `ppo`, the
critic; loaded in one process, or sharded with FSDP2 (rank 0 reads the weights, the other ranks
receive their shards: policy.py). `Models` is how the experience phase sees them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from rpp_lightning.config import CriticConfig, PolicyConfig
from rpp_lightning.rl.behaviour import WeightSnapshots
from rpp_lightning.rl.critic import load_critic, load_sharded_critic
from rpp_lightning.rl.policy import load_causal_lm, load_sharded_causal_lm

REFERENCE_PREFIX = "reference."  # the frozen reference model's keys (never checkpointed)


@dataclass(frozen=True)
class Models:
    """The trainer's models as the experience phase uses them."""

    policy: nn.Module  # the live weights, which the servers serve as `version`
    version: int
    reference: nn.Module | None = None  # None when kl_coef is 0: there is no KL term
    critic: nn.Module | None = None  # ppo only
    snapshots: WeightSnapshots | None = None  # older versions' weights (max_staleness ≥ 1)


def load_models(
    policy: PolicyConfig,
    with_reference: bool,
    critic: CriticConfig | None,
    mesh: DeviceMesh | None = None,
    device: torch.device | None = None,
) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    """(policy, reference or None, critic or None), in one process (`mesh` None: CPU, fp32) or
    sharded over the mesh's "data_parallel" dimension on `device` (every rank calls this)."""
    mixed = policy.mixed_precision
    reference, value_model = None, None
    if mesh is None:
        if mixed:
            raise ValueError(
                "policy.mixed_precision is FSDP2's: add --trainer.strategy fsdp2 "
                "(it also runs with --trainer.devices 1)"
            )
        model = load_causal_lm(policy)  # in this order, as ever: the same weights
        if with_reference:
            reference = load_causal_lm(policy, reference=True)
        if critic is not None:
            value_model = load_critic(critic, policy)
        return model, reference, value_model
    dp_mesh = mesh["data_parallel"]
    if mixed is None:
        mixed = dp_mesh.device_type == "cuda"
    model = load_sharded_causal_lm(policy, dp_mesh, device, False, mixed)
    if with_reference:
        reference = load_sharded_causal_lm(policy, dp_mesh, device, True, mixed)
    if critic is not None:  # the policy's plan, rank-0 load and precision
        value_model = load_sharded_critic(critic, policy, dp_mesh, device, mixed)
    return model, reference, value_model


def leave_reference_out_of_checkpoints(module: nn.Module) -> None:
    """Keep `module.reference` out of `module`'s state dict, and expect it in none loaded: the
    frozen reference is rebuilt from its path when the models load, so checkpoints leave it out
    (with Adam they hold three copies of the weights instead of four)."""
    module.register_state_dict_post_hook(_drop_reference_weights)
    module.register_load_state_dict_post_hook(_reference_weights_not_expected)


def _drop_reference_weights(module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + REFERENCE_PREFIX)]:
        del state_dict[key]


def _reference_weights_not_expected(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(REFERENCE_PREFIX)]
