"""The critic of `advantage_estimator: ppo`: a transformer with a scalar value head per token.

critic = load_critic(CriticConfig(), policy_config)                        # one process
critic = load_sharded_critic(CriticConfig(), policy_config, mesh, device)  # FSDP2 ranks
values = experience_values(critic, exp, micro_batch_size)                  # (N, R)

It starts from the policy's weights (the same loading code, its LM head dropped) or from
`critic.path`, e.g. a reward model whose one-label score head becomes the value head. It is
sharded with the policy's `fully_shard` plan and loaded by rank 0 only, like the policy.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from rpp_lightning.algorithms.losses import position_ids
from rpp_lightning.config import CriticConfig, PolicyConfig
from rpp_lightning.rl.experience import Experience, per_token_in_micro_batches
from rpp_lightning.rl.policy import _for_training, _hf_config, load_causal_lm, load_sharded

log = logging.getLogger("rpp.critic")


class CriticModel(nn.Module):
    """A decoder (`model`, the attribute `decoder_layers` looks under) and a linear value head."""

    def __init__(self, model: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.model = model  # a transformers base model: (N, L) ids -> (N, L, H) hidden states
        self.value_head = nn.Linear(hidden_size, 1)
        self.config = model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (N, L, H)
        return self.value_head(hidden).squeeze(-1).float()  # (N, L)


def _init_value_head(critic: CriticModel, seed: int) -> None:
    # OpenRLHF's initialisation: small values at the start, so GAE begins near the returns
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(critic.value_head.weight, std=1.0 / (critic.value_head.in_features + 1))
    nn.init.zeros_(critic.value_head.bias)


def _is_reward_model(hf_config) -> bool:
    names = getattr(hf_config, "architectures", None) or []
    return any(name.endswith("ForSequenceClassification") for name in names)


def _from_reward_model(path: str, config: PolicyConfig) -> CriticModel:
    from transformers import AutoModelForSequenceClassification

    scorer = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    critic = CriticModel(scorer.base_model, scorer.config.hidden_size)
    head = getattr(scorer, "score", None)
    if isinstance(head, nn.Linear) and head.out_features == 1:
        critic.value_head.weight.data.copy_(head.weight.data)
        if head.bias is not None:
            critic.value_head.bias.data.copy_(head.bias.data)
    else:
        log.info("%s has no one-label score head: the value head starts fresh", path)
        _init_value_head(critic, config.seed)
    return critic


def load_critic(critic: CriticConfig, policy: PolicyConfig) -> CriticModel:
    """The critic on CPU in fp32, from `critic.path` or from the policy's weights."""
    critic.validate()
    if critic.path is not None and _is_reward_model(_hf_config(policy, critic.path)):
        model = _from_reward_model(critic.path, policy)
    else:
        path = critic.path or policy.path
        source = PolicyConfig(**{**vars(policy), "path": path, "reference_path": None})
        if path is not None:
            source.config = None
        lm = load_causal_lm(source)
        model = CriticModel(lm.base_model, lm.config.hidden_size)
        _init_value_head(model, policy.seed)
    return _for_critic(model, policy)


def _for_critic(model: CriticModel, policy: PolicyConfig) -> CriticModel:
    _for_training(model.model, policy, reference=False)
    return model


def _empty_critic(critic: CriticConfig, policy: PolicyConfig) -> CriticModel:
    """The critic's structure without weights (built under the meta device on ranks > 0)."""
    from transformers import AutoModel

    hf_config = _hf_config(policy, critic.path or policy.path)
    model = CriticModel(
        AutoModel.from_config(hf_config, dtype=torch.float32), hf_config.hidden_size
    )
    return _for_critic(model, policy)


def load_sharded_critic(
    critic: CriticConfig,
    policy: PolicyConfig,
    mesh: DeviceMesh,
    device: torch.device,
    mixed_precision: bool = False,
) -> CriticModel:
    """The critic sharded with FSDP2 like the policy, read from storage by rank 0 only."""
    return load_sharded(
        lambda: load_critic(critic, policy),
        lambda: _empty_critic(critic, policy),
        mesh,
        device,
        mixed_precision,
    )


def response_values(
    critic: nn.Module, sequences: Tensor, attention_mask: Tensor, num_actions: int
) -> Tensor:
    """V(s_t) for each of the last `num_actions` tokens: the value of the state the token was
    chosen in, read at the position before it (where its log-prob is read too).

    sequences, attention_mask (N, L) -> (N, R) float32.
    """
    positions = position_ids(attention_mask)  # (N, L), as the policy's
    values = critic(sequences, attention_mask, positions)  # (N, L)
    return values[:, -num_actions - 1 : -1]  # (N, R)


def experience_values(critic: nn.Module, exp: Experience, micro_batch_size: int) -> Tensor:
    """Values (N, R) of every response token of `exp`, in micro-batches, without grad."""
    (values,) = per_token_in_micro_batches(
        exp,
        micro_batch_size,
        lambda micro: (
            response_values(critic, micro.sequences, micro.attention_mask, micro.num_actions),
        ),
    )
    return values
