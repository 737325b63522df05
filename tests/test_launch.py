"""The launch words users type: `--trainer.strategy fsdp` (or `strategy: fsdp` in YAML) runs the
project's FSDP2 strategy on CPU as on CUDA; Lightning's other FSDP1 names are refused in one line
before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from test_trainer import TINY, fit_args, read_metrics, remote, run_ok, servers  # noqa: F401

from rpp_lightning.trainer.strategy import FSDP2Strategy


def strategy_of(tmp_path, monkeypatch, *args: str):
    from rpp_lightning.cli import cli_main

    monkeypatch.chdir(ROOT)  # tiny.yaml names its tokenizer relative to the repository
    argv = ["--config", TINY, "--trainer.default_root_dir", str(tmp_path), *args]
    return cli_main(argv, run=False).trainer.strategy


def test_fsdp_on_the_command_line_or_in_yaml_is_fsdp2(tmp_path, monkeypatch, caplog) -> None:
    with caplog.at_level("INFO"):
        typed = strategy_of(
            tmp_path, monkeypatch, "--trainer.devices", "2", "--trainer.strategy", "fsdp"
        )
    assert type(typed) is FSDP2Strategy
    assert "strategy 'fsdp' runs as 'fsdp2'" in caplog.text
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"strategy": "FSDP", "devices": 2}}))
    assert type(strategy_of(tmp_path, monkeypatch, "--config", str(config))) is FSDP2Strategy
    assert type(strategy_of(tmp_path, monkeypatch, "--trainer.strategy", "fsdp2")) is FSDP2Strategy
    assert type(strategy_of(tmp_path, monkeypatch)).__name__ == "SingleDeviceStrategy"  # untouched


def test_lightnings_other_fsdp1_names_are_refused_in_one_line(tmp_path) -> None:
    argv = [
        sys.executable,
        "-m",
        "rpp_lightning.cli",
        *fit_args("--trainer.strategy", "fsdp_cpu_offload"),
    ]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "rpp-train: error: --trainer.strategy fsdp_cpu_offload is Lightning's FSDP1, which "
        "rpp-train does not run; use --trainer.strategy fsdp2 (FSDP2, CPU or CUDA)"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_cpu_ranks_train_with_strategy_fsdp(servers, tmp_path) -> None:  # noqa: F811
    """`rpp-train fit --config configs/tiny.yaml --trainer.devices 2 --trainer.strategy fsdp`,
    one iteration on two CPU processes (gloo)."""
    argv = [
        sys.executable, "-m", "rpp_lightning.cli",
        *fit_args(*remote(servers), "--trainer.devices", "2", "--trainer.strategy", "fsdp",
                  "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"),
    ]  # fmt: skip
    result = run_ok(argv, tmp_path)
    assert "strategy 'fsdp' runs as 'fsdp2'" in result.stdout + result.stderr
    log_dir = sorted((tmp_path / "runs" / "tiny" / "csv").iterdir())[-1]
    assert len(read_metrics(log_dir)) == 1  # one iteration trained (a policy_loss logged)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["trainer"]["strategy"] == "fsdp2"  # what ran, not what was typed
