"""The CUDA checks that scripts/gpu_check.sh runs, one per subcommand (see that script).

    python scripts/gpu_checks.py probe                        # one JSON line: CUDA, devices
    python scripts/gpu_checks.py preference_bf16              # one check
    python scripts/gpu_checks.py nccl_whitening --device cpu  # its logic on CPU (gloo)

Each check runs the project's real code path (servers as child processes over real gRPC, the
trainer CLI, torch.distributed under torchrun) and ends with exactly one line
`check <name>: passed|failed|skipped (<detail>)`; the exit code is 1 only when it failed.
`--device cpu` runs a check's logic on CPU (gloo for NCCL), so that the checks themselves can be
tried on a machine without a GPU; gpu_check.sh never passes it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the working tree's code, whether or not it is pip-installed
# Child processes (servers, trainer, torchrun ranks) import the working tree's code too.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
CHECKS = [
    "pytest_gpu",
    "tiny_train_bf16",
    "preference_bf16",
    "generation_cuda",
    "nccl_whitening",
    "vllm_backend",
]
STATUSES = ("passed", "failed", "skipped")
RESULT_LINE = re.compile(r"^check (\w+): (passed|failed|skipped)(?: \((.*)\))?$")
# The preference check's tolerance, as a fraction of the spread (max - min) of the fp32 scores.
# bf16 keeps 8 significant bits; through the tiny classifier (initializer_range 0.2, so scores
# spread over ~2.7) bf16 moved scores by at most 1.2% of that spread on CPU, whose bf16 matmuls
# accumulate in fp32 as CUDA's do. 5% leaves 4x room, and is still far below what a wrong
# padding, a mixed-up row order or a garbage kernel does: scores then move by about their std,
# ~30% of the spread.
PREFERENCE_TOL = 5e-2
PREFERENCE_MIN_SPREAD = 1.0  # below this the model is not the one the tolerance was set for


class Skip(Exception):
    """The check cannot run here (no CUDA, no vLLM); the message says why."""


def _require_cuda(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA: torch.cuda.is_available() is False")


def _run(argv: list[str], cwd: Path, timeout_s: float) -> tuple[int, str]:
    """Run `argv`, echo its output into this check's log as it comes, return (rc, output).

    Past `timeout_s` the child gets SIGTERM (a trainer stops its servers, torchrun its ranks),
    then SIGKILL; the check then fails saying so, before gpu_check.sh's own `timeout` fires.
    """
    print("$", " ".join(argv), flush=True)
    proc = subprocess.Popen(
        argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise AssertionError(f"timed out after {timeout_s:.0f}s: {' '.join(argv[1:4])}") from None
    reader.join(10)
    return rc, "".join(lines)


def pytest_gpu(device: str, timeout_s: float) -> str:
    """The gpu-marked tests, except the vLLM ones (vllm_backend runs those)."""
    _require_cuda(device)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    argv += ["--ignore", "tests/test_generation_vllm.py"]
    rc, out = _run(argv, ROOT, timeout_s)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    passed = re.search(r"(\d+) passed", summary)
    if rc != 0 or not passed:
        raise AssertionError(f"pytest exit {rc}: {summary}")
    return summary.strip("= ")


def tiny_train_bf16(device: str, timeout_s: float) -> str:
    """3 iterations of configs/tiny.yaml under FSDP2 with bf16 mixed precision on `device`.

    The local generation server runs on the same device; with its dtype "auto" it serves bf16 on
    CUDA, the dtype the trainer pushes there, so a finished run also proves the bf16 push.
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
            "--model.generation.local_args", f"[--device, {device}]",
        ]  # fmt: skip
        rc, out = _run(argv, Path(tmp), timeout_s)
        if rc != 0:
            raise AssertionError(f"rpp-train exit {rc}: {out.strip().splitlines()[-1:]}")
        if device == "cuda" and "GPU available: True (cuda), used: True" not in out:
            raise AssertionError("Lightning did not report training on the GPU")
        found = sorted(Path(tmp).glob("runs/tiny/csv/version_*/metrics.csv"))
        if not found:
            raise AssertionError("the run wrote no metrics.csv")
        with found[-1].open() as f:
            rows = [row for row in csv.DictReader(f) if row.get("policy_loss")]
    if len(rows) != 3:
        raise AssertionError(f"metrics.csv has {len(rows)} training iterations, expected 3")
    losses = [float(row["policy_loss"]) for row in rows]
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"non-finite policy loss: {losses}")
    gap = max(float(row.get("logprob_gap") or "nan") for row in rows)
    return f"3 iterations, policy_loss {losses}, max engine/trainer logprob gap {gap:.2e}"


def preference_bf16(device: str, timeout_s: float) -> str:
    """The preference server in bf16 against the same server in fp32, over real gRPC."""
    _require_cuda(device)
    import grpc

    from rpp_lightning.local_servers import ChildServer, reward_server_argv
    from rpp_lightning.proto import reward_pb2, reward_pb2_grpc
    from rpp_lightning.tiny import save_tiny_classifier

    # Varied lengths (some past max_length=64), so padding and truncation both happen.
    samples = [
        reward_pb2.Sample(
            id=f"s{i}", prompt=f"What is {i} + 3?", response="Let me think. " * (i % 7) + f"{i}"
        )
        for i in range(24)
    ]
    scores: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="rpp-gpu-rm-") as tmp:
        # initializer_range 0.2 (not 0.02): scores spread over ~2.7, not ~0.02.
        path = save_tiny_classifier(Path(tmp) / "rm", initializer_range=0.2)
        for dtype in ("float32", "bfloat16"):
            args = ["--model", str(path), "--verifier-args", f"device={device}", f"dtype={dtype}"]
            args += ["max_length=64", "token_budget=512"]
            server = ChildServer(reward_server_argv("preference", args), f"preference-{dtype}")
            try:
                loaded = f"on {device}" in server.text and f"(torch.{dtype})" in server.text
                if not loaded:  # the server's "loaded PATH on DEVICE (DTYPE)" line
                    raise AssertionError(f"server did not load on {device} in {dtype}")
                with grpc.insecure_channel(server.address) as channel:
                    stub = reward_pb2_grpc.RewardServiceStub(channel)
                    reply = stub.Score(reward_pb2.ScoreRequest(samples=samples), timeout=60)
                scores[dtype] = [s.reward for s in reply.scores]
            finally:
                server.stop(timeout_s=10)
    full, half = scores["float32"], scores["bfloat16"]
    spread = max(full) - min(full)
    if spread < PREFERENCE_MIN_SPREAD:  # near-equal scores would make the comparison toothless
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

    from rpp_lightning.generation.client import GenerationClient, SamplingConfig
    from rpp_lightning.local_servers import ChildServer, generation_server_argv
    from rpp_lightning.tiny import save_tiny_causal_lm

    prompts = [[1, 40, 41, 42, 43], [1, 50], [1, 60, 61, 62, 63, 64, 65, 66, 67], [1, 30, 31]]
    with tempfile.TemporaryDirectory(prefix="rpp-gpu-lm-") as tmp:
        path = save_tiny_causal_lm(Path(tmp) / "lm")
        # fp32 on both sides, so greedy tokens must be equal, not merely close.
        argv = generation_server_argv(str(path), ["--device", device, "--dtype", "float32"])
        server = ChildServer(argv, name="generation-server")
        try:
            if f"on {device}" not in server.text:  # the backend's "loaded PATH on DEVICE" line
                raise AssertionError(f"generation server did not load on {device}")
            with GenerationClient([server.address], timeout_s=60) as client:
                client.wait_until_ready(timeout_s=60)
                # One request, so the server batches the prompts with left padding.
                sampling = SamplingConfig(n=1, temperature=0, max_new_tokens=24, seed=0)
                rollouts = client.generate(prompts, sampling)
        finally:
            server.stop(timeout_s=10)
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
            logprobs = torch.log_softmax(model(full).logits[0].float(), -1)  # (T, V)
            positions = torch.arange(len(prompt) - 1, full.shape[1] - 1, device=device)
            direct = logprobs[positions, full[0, len(prompt) :]].cpu()
        worst = max(worst, (direct - torch.tensor(rollout.logprobs)).abs().max().item())
    if worst > 1e-4:
        raise AssertionError(f"server logprobs differ from a direct forward by {worst:.2e}")
    return f"{len(prompts)} prompts: same greedy tokens, logprobs within {worst:.1e} of direct"


def _whitening_parts() -> list[dict]:
    """Two ranks' slices of one rollout batch: different B, T and masks, one all-masked row."""
    import torch

    gen = torch.Generator().manual_seed(0)
    masks = [
        torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]]),
        torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 0, 0]]),
    ]
    return [
        {
            "rewards": torch.randn(len(mask), generator=gen),
            "kl": torch.randn(mask.shape, generator=gen) * 0.1,
            "mask": mask,
        }
        for mask in masks
    ]


def _concatenated(parts: list[dict]) -> dict:
    import torch
    from torch.nn.functional import pad

    width = max(p["mask"].shape[1] for p in parts)
    widen = lambda t, v: pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    return {  # padding holds garbage on purpose: the mask must keep it out
        "rewards": torch.cat([p["rewards"] for p in parts]),
        "kl": torch.cat([widen(p["kl"], 1e6) for p in parts]),
        "mask": torch.cat([widen(p["mask"], 0) for p in parts]),
    }


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

    backend = "nccl" if device == "cuda" else "gloo"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        parts = _whitening_parts()
        # One rank holds the whole batch; two ranks hold one slice each.
        part = _concatenated(parts) if world == 1 else parts[rank]
        target = torch.device(device, torch.cuda.current_device()) if device == "cuda" else None
        on_device = {k: v.to(target or "cpu") for k, v in part.items()}
        out = _advantages(on_device, group=dist.group.WORLD)
        result = {
            "backend": dist.get_backend(),
            "device": str(out.advantages.device),
            "advantages": out.advantages.cpu(),
            "returns": out.returns.cpu(),
            "stats": out.stats,
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def nccl_whitening(device: str, timeout_s: float) -> str:
    """Global advantage whitening all-reduced over NCCL = one process on the whole batch."""
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
    parts = _whitening_parts()
    reference = _advantages(_concatenated(parts))  # one process, CPU, no process group
    rows = [slice(0, 8)] if world == 1 else [slice(0, 3), slice(3, 8)]
    worst = 0.0
    for res, row in zip(results, rows, strict=True):
        expected_backend = "nccl" if device == "cuda" else "gloo"
        if res["backend"] != expected_backend or not res["device"].startswith(device):
            raise AssertionError(f"ran on {res['backend']} / {res['device']}")
        width = res["advantages"].shape[1]
        for key in ("advantages", "returns"):
            expected = getattr(reference, key)[row, :width]
            worst = max(worst, (res[key] - expected).abs().max().item())
        for key, value in reference.stats.items():
            worst = max(worst, abs(res["stats"][key] - value))
    if worst > 1e-5:
        raise AssertionError(f"all-reduced whitening differs from one process by {worst:.2e}")
    return f"{world} rank(s) on {expected_backend}: within {worst:.1e} of one process"


def vllm_backend(device: str, timeout_s: float) -> str:
    """tests/test_generation_vllm.py, when vLLM can be imported here."""
    _require_cuda(device)
    probe = subprocess.run(
        [sys.executable, "-c", "import vllm; print(vllm.__version__)"],
        env=ENV, capture_output=True, text=True, timeout=min(120.0, timeout_s),
    )  # fmt: skip
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise Skip(f"vllm not importable: {last}")
    print(f"vllm {probe.stdout.strip()}", flush=True)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    rc, out = _run([*argv, "tests/test_generation_vllm.py"], ROOT, timeout_s)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if rc != 0 or "1 passed" not in summary:
        raise AssertionError(f"pytest exit {rc}: {summary}")
    return f"vllm {probe.stdout.strip()}: {summary.strip('= ')}"


def probe() -> dict:
    """What this machine has: CUDA, devices, NCCL, and the versions of the packages used."""
    from importlib import metadata

    import torch

    info: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["cuda_version"] = torch.version.cuda
        count = torch.cuda.device_count()
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(count)]
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        info["reason"] = "no CUDA: torch.cuda.is_available() is False"
    for name in ("lightning", "transformers", "grpcio", "math-verify", "vllm"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def summary(lines_path: Path, info: dict, wall_s: float, logs: str) -> dict:
    """The final JSON object from the `check NAME: STATUS (DETAIL)` lines gpu_check.sh kept."""
    checks: dict[str, str] = {}
    for line in lines_path.read_text().splitlines():
        match = RESULT_LINE.match(line)
        if match:
            name, status, detail = match.groups()
            checks[name] = f"{status}: {detail}" if detail else status
    for name in CHECKS:  # a check with no result line is a failure of the script itself
        checks.setdefault(name, "failed: no result line")
    counts = {s: sum(v.startswith(s) for v in checks.values()) for s in STATUSES}
    return {"cuda": bool(info.get("cuda")), "checks": checks, **counts, "wall_s": wall_s,
            "probe": info, "logs": logs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*CHECKS, "probe", "nccl_rank", "summary"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--timeout-s", type=float, default=300.0, help="for the check's children")
    parser.add_argument("--out", help="nccl_rank: where to save the rank's results")
    parser.add_argument("--lines", help="summary: file of check result lines")
    parser.add_argument("--probe-json", help="summary: the probe's JSON line")
    parser.add_argument("--wall-s", type=float, default=0.0, help="summary: the script's time")
    parser.add_argument("--logs", default="", help="summary: where the logs are")
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe()))
        return 0
    if args.command == "nccl_rank":
        nccl_rank(args.device, args.out)
        return 0
    if args.command == "summary":
        info = json.loads(args.probe_json or "{}")
        result = summary(Path(args.lines), info, args.wall_s, args.logs)
        print(json.dumps(result))
        return 1 if result["failed"] else 0
    check: Callable[[str, float], str] = globals()[args.command]
    try:
        detail = check(args.device, args.timeout_s)
    except Skip as skip:
        print(f"check {args.command}: skipped ({skip})", flush=True)
        return 0
    except Exception as exc:  # any error is this check's failure; the traceback goes to the log
        import traceback

        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        print(f"check {args.command}: failed ({reason})", flush=True)
        return 1
    print(f"check {args.command}: passed ({detail})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
