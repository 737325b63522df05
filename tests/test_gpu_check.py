"""scripts/gpu_check.sh without CUDA: every check skipped with its reason, exit 0, one line per
check and a final JSON line naming all eight, in at most 8 files (a failed probe too). CUDA is
hidden from the script here (CUDA_VISIBLE_DEVICES=""), so this checks the skipping on GPU
machines too; there, run the script itself (see the README's GPU section)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

CHECKS = {
    "pytest_gpu",
    "tiny_train_bf16",
    "preference_bf16",
    "generation_cuda",
    "nccl_whitening",
    "vllm_backend",
    "weight_transport_cuda",
    "perf_iteration",
}
SHARED = {"weight_transport_cuda": "weights", "perf_iteration": "weights"}  # one log for both
LOGS = {name: f"gpu_check_{SHARED.get(name, name)}.log" for name in CHECKS}
NO_CUDA = "no CUDA: torch.cuda.is_available() is False"


def _gpu_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "scripts" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_without_cuda_every_check_is_skipped_with_its_reason(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(out)}
    env.pop("GPU_CHECK_DEVICE", None)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        cwd=tmp_path,  # the script finds the repository by itself
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(CHECKS) + 1, result.stdout  # one line per check, then the JSON
    skipped = [re.fullmatch(r"check (\w+): skipped \((.+)\)", line) for line in lines[:-1]]
    assert all(skipped), lines[:-1]
    assert sorted(m.group(1) for m in skipped) == sorted(CHECKS)  # each check exactly once
    assert {m.group(2) for m in skipped} == {NO_CUDA}

    summary = json.loads(lines[-1])
    assert summary["cuda"] is False
    assert summary["checks"] == {name: f"skipped: {NO_CUDA}" for name in CHECKS}
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (0, 0, len(CHECKS))
    assert summary["logs"] == str(out)

    # $OUT: a log per check (two share one) saying why it did not run, and the JSON; at most 8
    # files, which is all the device machine returns.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted({"gpu_check.json", *LOGS.values()})
    assert len(files) <= 8
    assert json.loads((out / "gpu_check.json").read_text()) == summary
    for name in CHECKS:
        assert f"check {name}: skipped ({NO_CUDA})" in (out / LOGS[name]).read_text()


@pytest.mark.timeout(60)
def test_a_failed_probe_fails_every_check_and_its_output_goes_into_their_logs(tmp_path) -> None:
    out = tmp_path / "out"
    python = tmp_path / "python"  # fails the probe, runs the summary
    python.write_text(
        '#!/usr/bin/env bash\nif [ "$2" = probe ]; then echo "probe broke here" >&2; exit 3; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    env = {**os.environ, "OUT": str(out), "PYTHON": str(python)}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(CHECKS) + 1, result.stdout
    assert all(re.fullmatch(r"check \w+: failed \(the probe failed: .+\)", x) for x in lines[:-1])
    assert json.loads(lines[-1])["failed"] == len(CHECKS)
    files = sorted(p.name for p in out.iterdir())  # no file of the probe's own: still 8
    assert files == sorted({"gpu_check.json", *LOGS.values()})
    for name in CHECKS:
        assert "probe broke here" in (out / LOGS[name]).read_text()


def test_summary_counts_failures_and_fails_a_check_without_a_result_line() -> None:
    gpu_checks = _gpu_checks()
    assert set(gpu_checks.CHECKS) == CHECKS
    lines = [
        "check pytest_gpu: passed (1 passed, 230 deselected in 9.1s)",
        "check tiny_train_bf16: failed (AssertionError: rpp-train exit 1: (see log))",
        "check vllm_backend: skipped (vllm not importable: No module named 'vllm')",
        "some other output",
    ]
    summary = gpu_checks.summary("\n".join(lines), '{"cuda": true}', 12.0, "/logs")
    assert summary["cuda"] is True
    assert summary["checks"]["pytest_gpu"] == "passed: 1 passed, 230 deselected in 9.1s"
    assert summary["checks"]["tiny_train_bf16"] == (
        "failed: AssertionError: rpp-train exit 1: (see log)"
    )
    assert summary["checks"]["vllm_backend"].startswith("skipped: vllm not importable")
    missing = ["preference_bf16", "generation_cuda", "nccl_whitening", "weight_transport_cuda"]
    for name in [*missing, "perf_iteration"]:
        assert summary["checks"][name] == "failed: no result line"
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 6, 1)
    assert json.loads(json.dumps(summary)) == summary
