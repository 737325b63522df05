"""The quickstart end to end, and the embedded servers' promise: no orphan processes, ever.

Every run here is the README's command path, `python -m rpp_lightning.cli fit --config ...`,
with the real committed SFT policy (or the tiny config), a real transformers generation server
and a real math-verify reward server started by the trainer as child processes.
Process trees are read from /proc (Linux), as `ps --ppid` would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, wait_for
from process_tree import SERVER_MODULES, Tree

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="/proc")]

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = str(ROOT / "configs" / "tiny.yaml")
DATA = ROOT / "data" / "arithmetic"


def start_training(cwd: Path, config: str, *overrides: str) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "rpp_lightning.cli", "fit", "--config", config,
        "--data.train_path", str(DATA / "train.jsonl"),
        "--trainer.enable_progress_bar", "false",
        *overrides,
    ]  # fmt: skip
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a hang can be made to show its stacks
    return subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def small_val_set(tmp_path: Path, rows: int = 24) -> Path:
    lines = (DATA / "val.jsonl").read_text().splitlines()[:rows]
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_run(tmp_path: Path) -> list[str]:
    """Overrides for a configs/tiny.yaml run from a temporary directory (local servers)."""
    return [
        "--model.policy.tokenizer", str(ROOT / "assets" / "char_tokenizer"),
        "--data.val_path", str(small_val_set(tmp_path, 8)),
        "--trainer.callbacks", "[]",
    ]  # fmt: skip


def run_to_completion(proc: subprocess.Popen) -> tuple[Tree, str]:
    """Wait for a training run, remembering every process it started; return them and output."""
    tree = Tree(proc.pid)
    while proc.poll() is None:
        tree.poll()
        time.sleep(0.1)
    return tree, proc.stdout.read()


@pytest.mark.timeout(180)
def test_shortened_quickstart_end_to_end(tmp_path):
    """`rpp-train fit --config configs/quickstart.yaml`, 2 iterations and a small held-out set."""
    proc = start_training(
        tmp_path,
        QUICKSTART,
        "--model.policy.path", str(ROOT / "assets" / "quickstart_policy"),
        "--data.val_path", str(small_val_set(tmp_path)),
        "--data.val_batch_size", "24",
        "--model.rollout.max_iterations", "2",
        "--trainer.val_check_interval", "1",
    )  # fmt: skip
    tree, output = run_to_completion(proc)
    try:
        assert proc.returncode == 0, output[-6000:]
        assert re.search(r"held-out accuracy [\d.]+% → [\d.]+%", output), output[-3000:]
        assert all(tree.started(module) for module in SERVER_MODULES), tree.commands
        assert wait_for(lambda: not tree.survivors(), timeout_s=10), tree.survivors()
    finally:
        tree.kill_survivors()
    log_dir = sorted((tmp_path / "runs" / "quickstart" / "csv").iterdir())[-1]
    assert (log_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("reward", "accuracy", "kl", "response_length", "val/accuracy"):
        assert key in header, header
    export = log_dir / "hf_export"
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_no_orphans_when_the_trainer_is_interrupted_or_killed(tmp_path, signum):
    proc = start_training(
        tmp_path,
        TINY,
        *tiny_run(tmp_path),
        "--model.export_dir", "null",
        "--model.rollout.max_iterations", "100000",
    )  # fmt: skip
    tree = Tree(proc.pid)
    try:
        # hparams.yaml is written after setup, i.e. once both servers passed their health checks
        logs = tmp_path / "runs" / "tiny" / "csv"

        def training() -> bool:
            tree.poll()
            up = sorted(tree.servers()) == sorted(SERVER_MODULES)
            return proc.poll() is not None or (up and any(logs.glob("*/hparams.yaml")))

        assert wait_for(training, timeout_s=120, interval_s=0.2)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        tree.poll()  # the reward server's verifier workers too
        proc.send_signal(signum)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:  # say where it hangs: faulthandler dumps every thread
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            raise AssertionError(proc.stdout.read()[-8000:]) from None
        # SIGINT: Lightning's graceful shutdown and our atexit hook stop the servers. SIGKILL:
        # nothing runs in the trainer; the kernel's PR_SET_PDEATHSIG sends them SIGTERM.
        assert wait_for(lambda: not tree.survivors(), timeout_s=20), tree.survivors()
        assert proc.returncode != 0
    finally:
        tree.kill_survivors()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(150)
def test_no_orphans_when_training_fails(tmp_path):
    # 4 prompts × 2 samples = 8 rollouts per step cannot be split into mini-batches of 6: the
    # first training step raises, after the servers are up
    proc = start_training(
        tmp_path,
        TINY,
        *tiny_run(tmp_path),
        "--model.algorithm.mini_batch_size", "6",
        "--model.algorithm.micro_batch_size", "3",
        "--model.export_dir", "null",
    )  # fmt: skip
    tree, output = run_to_completion(proc)
    try:
        assert proc.returncode != 0
        assert "not a multiple of mini_batch_size" in output, output[-3000:]
        assert all(tree.started(module) for module in SERVER_MODULES), tree.commands
        assert wait_for(lambda: not tree.survivors(), timeout_s=20), tree.survivors()
    finally:
        tree.kill_survivors()
