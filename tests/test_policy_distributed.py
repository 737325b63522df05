"""FSDP2 loading on 2 gloo processes: rank 0 reads the weights, rank 1 gets its shards."""

from __future__ import annotations

import pytest
import torch
from two_ranks import run_on_two_ranks

from rpp_lightning.config import PolicyConfig
from rpp_lightning.rl.policy import full_state_dict, load_causal_lm, load_sharded_causal_lm


def _worker(rank: int, model_dir: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    config = PolicyConfig(path=model_dir)
    reads = []
    if rank == 1:  # rank 1 must not read the weights file: only its config
        import transformers

        original = transformers.AutoModelForCausalLM.from_pretrained
        transformers.AutoModelForCausalLM.from_pretrained = lambda *a, **k: reads.append(a)
    model = load_sharded_causal_lm(config, mesh, torch.device("cpu"))
    reference = load_sharded_causal_lm(config, mesh, torch.device("cpu"), reference=True)
    if rank == 1:
        transformers.AutoModelForCausalLM.from_pretrained = original
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():  # a forward all-gathers the shards: every rank runs it
        logits = model(input_ids=ids).logits
        reference_logits = reference(input_ids=ids).logits
    state = full_state_dict(model)  # gathered on every rank, kept by rank 0
    torch.save(
        {
            "logits": logits,
            "reference_logits": reference_logits,
            "buffers": {name: b.clone() for name, b in model.named_buffers()},
            "state": state,
            "reads": len(reads),
            "reference_trains": any(p.requires_grad for p in reference.parameters()),
        },
        f"{out_dir}/rank{rank}.pt",
    )


@pytest.mark.timeout(180)
def test_rank0_loads_and_every_rank_gets_the_same_model(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from rpp_lightning.tiny import tiny_llama_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(tmp_path / "model")
    run_on_two_ranks(_worker, str(tmp_path / "model"), str(tmp_path))
    direct = load_causal_lm(PolicyConfig(path=str(tmp_path / "model")))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        expected = direct(input_ids=ids).logits
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[1]["reads"] == 0  # rank 1 never loaded the weights
    for result in ranks:
        torch.testing.assert_close(result["logits"], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["reference_logits"], expected, atol=1e-5, rtol=1e-5)
        assert not result["reference_trains"]
        # non-persistent buffers (the rotary frequencies) are no state dict's: broadcast too
        for name, buffer in dict(direct.named_buffers()).items():
            torch.testing.assert_close(result["buffers"][name], buffer)
    gathered = ranks[0]["state"]
    assert gathered.keys() == direct.state_dict().keys()
    for name, tensor in direct.state_dict().items():
        torch.testing.assert_close(gathered[name], tensor)
