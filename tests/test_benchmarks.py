"""The step-breakdown benchmark runs end to end and reports what its last line promises."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_step_breakdown_reports_every_phase() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/step_breakdown.py", "--iterations", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    phases = ["generate_s", "score_s", "logprobs_s", "update_s", "weight_push_s"]
    for key in ["step_s", *phases]:
        assert figures[key] > 0, (key, figures)
    # the phases the trainer waits for fit inside the whole iteration (scoring overlaps them)
    waited = sum(figures[k] for k in phases if k != "score_s") + figures["score_wait_s"]
    assert waited < figures["step_s"]
    # the weight push alone is overhead, and the bookkeeping comes on top of the overhead
    assert figures["weight_push_s"] / figures["step_s"] <= figures["overhead_fraction"] < 1
    assert figures["overhead_fraction"] < figures["non_model_fraction"] < 1
    assert figures["iterations"] == 2  # 4 minus the warm-up and the last (no successor)
