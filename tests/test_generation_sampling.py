"""The transformers generation server samples exactly what a plain reference loop samples.

Real gRPC server on loopback, real tiny Llama: greedy and seeded sampling (temperature, top-k,
top-p, stop tokens, n > 1) equal the reference loop token for token, logprobs equal a direct
forward, and batching concurrent requests together changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from generation_helpers import (
    PROMPTS,
    assert_seeds_fix_tokens_however_batched,
    direct_logprobs,
    reference_sample,
    request,
    running_server,
    seeds_of,
    stub_for,
)
from transformers import AutoModelForCausalLM

from rpp_lightning.clients.generation import GenerationClient, SamplingConfig
from rpp_lightning.generation.server import GenerationLimits
from rpp_lightning.proto import generation_pb2 as pb


@pytest.fixture(scope="module")
def server(tiny_lm_path):
    with running_server(tiny_lm_path, GenerationLimits(max_new_tokens_limit=64)) as running:
        yield running


@pytest.fixture(scope="module")
def model(tiny_lm_path):
    return AutoModelForCausalLM.from_pretrained(tiny_lm_path).eval()


@pytest.mark.timeout(60)
def test_greedy_equals_reference_and_hf_generate(server, model) -> None:
    address = server[0].address
    with stub_for(address) as stub:
        reply = stub.Generate(request(PROMPTS, temperature=0, max_new_tokens=24, seed=0))
    for prompt, result in zip(PROMPTS, reply.results, strict=True):
        completion = result.completions[0]
        expected, reason = reference_sample(model, prompt, 0, 24, temperature=0)
        assert list(completion.token_ids) == expected
        hf = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=2,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert list(completion.token_ids) == hf
        assert completion.finish_reason == (
            pb.FINISH_REASON_STOP if reason == "stop" else pb.FINISH_REASON_LENGTH
        )


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=20, top_p=0.9),
    ],
)
def test_seeded_sampling_equals_reference_with_logprobs(server, model, params) -> None:
    seed, n = 1234, 3
    with stub_for(server[0].address) as stub:
        reply = stub.Generate(request(PROMPTS, n=n, max_new_tokens=20, seed=seed, **params))
    distinct = set()
    for p, (prompt, result) in enumerate(zip(PROMPTS, reply.results, strict=True)):
        assert result.prompt_id == str(p) and len(result.completions) == n
        for completion, row_seed in zip(result.completions, seeds_of(seed, p, n), strict=True):
            expected, _ = reference_sample(model, prompt, row_seed, 20, **params)
            tokens = list(completion.token_ids)
            assert tokens == expected
            torch.testing.assert_close(
                torch.tensor(list(completion.logprobs)),
                direct_logprobs(model, prompt, tokens),
                atol=1e-4,
                rtol=0,
            )
            distinct.add(tuple(tokens))
    assert len(distinct) > len(PROMPTS)  # samples of one prompt differ: the seeds are per row


@pytest.mark.timeout(60)
def test_stop_tokens_and_finish_reasons(server, model) -> None:
    # Greedy output of prompt 0 is known; stopping at its 4th token must end there, included.
    with stub_for(server[0].address) as stub:
        free = stub.Generate(request(PROMPTS[:1], temperature=0, max_new_tokens=12, seed=0))
        tokens = list(free.results[0].completions[0].token_ids)
        stop = tokens[3]
        first = tokens.index(stop)
        stopped = stub.Generate(
            request(PROMPTS[:1], temperature=0, max_new_tokens=12, seed=0, stop_token_ids=[stop])
        )
    completion = stopped.results[0].completions[0]
    assert list(completion.token_ids) == tokens[: first + 1]
    assert completion.finish_reason == pb.FINISH_REASON_STOP
    assert free.results[0].completions[0].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.timeout(60)
def test_same_seed_same_tokens_and_batching_does_not_matter(server) -> None:
    assert_seeds_fix_tokens_however_batched(
        server[0].address, server[1], request([[1, 5]], temperature=0, max_new_tokens=64)
    )


@pytest.mark.timeout(60)
def test_client_spreads_prompts_and_keeps_order(server, model) -> None:
    prompts = PROMPTS * 3
    sampling = SamplingConfig(n=2, temperature=0.8, max_new_tokens=10, seed=99)
    with GenerationClient([server[0].address], max_prompts_per_call=2) as client:
        small_pieces = client.generate(prompts, sampling)
    with GenerationClient([server[0].address], max_prompts_per_call=64) as client:
        one_piece = client.generate(prompts, sampling)
    assert [(r.prompt_index, r.sample_index) for r in small_pieces] == [
        (p, j) for p in range(len(prompts)) for j in range(2)
    ]
    # How the client splits a call never changes the tokens of a seeded call.
    assert [r.token_ids for r in small_pieces] == [r.token_ids for r in one_piece]
    for rollout in small_pieces:
        assert rollout.weights_version == 0
        assert rollout.finish_reason in {"stop", "length"}
        assert len(rollout.logprobs) == len(rollout.token_ids)
