"""The vLLM backend against the same contract. Needs `vllm` and a CUDA GPU: skipped otherwise
(this repository's CI has neither; see docs/generation-servers-readme-section.md)."""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM backend needs CUDA"),
]


@pytest.fixture(scope="module")
def backend(tiny_lm_path):
    from rpp_lightning.generation.vllm_backend import VLLMBackend, VLLMConfig

    return VLLMBackend(
        VLLMConfig(model=str(tiny_lm_path), dtype="float32", gpu_memory_utilization=0.3)
    )


@pytest.mark.timeout(600)
def test_vllm_backend_seeds_logprobs_and_weight_swap(backend, tiny_lm_path) -> None:
    from generation_helpers import direct_logprobs
    from transformers import AutoModelForCausalLM

    from rpp_lightning.generation.backend import SampleRow

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path).eval()
    rows = [SampleRow([1, 30, 31], 12, seed=s, temperature=1.0, top_k=20) for s in (1, 1, 2)]
    first = backend.generate(rows)
    assert first[0].token_ids == first[1].token_ids  # same seed, same tokens
    for result in first:
        assert result.finish_reason in {"stop", "length"}
        torch.testing.assert_close(
            torch.tensor(result.logprobs),
            direct_logprobs(model, [1, 30, 31], result.token_ids),
            atol=2e-3,
            rtol=0,
        )
    greedy = [SampleRow([1, 30, 31], 12, seed=0, temperature=0)]
    before = backend.generate(greedy)[0].token_ids
    state = {k: v + 0.5 * torch.randn_like(v) for k, v in model.state_dict().items()}
    backend.load_weights(state)
    model.load_state_dict(state)
    after = backend.generate(greedy)[0].token_ids
    assert after != before
    expected = model.generate(
        torch.tensor([[1, 30, 31]]),
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=2,
        pad_token_id=0,
    )[0, 3:].tolist()
    assert after == expected[: len(after)]
