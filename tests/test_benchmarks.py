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


def test_compare_estimators_reports_every_figure(tmp_path) -> None:
    """Two estimators, one seed, two iterations: every figure the comparison promises is on its
    last line, for each estimator; a second invocation reads the cached runs."""
    held_out = tmp_path / "val.jsonl"  # 24 of the 200 held-out prompts: 4 evaluations a run
    lines = (ROOT / "data" / "arithmetic" / "val.jsonl").read_text().splitlines()[:24]
    held_out.write_text("\n".join(lines) + "\n")
    argv = [
        sys.executable, "benchmarks/compare_estimators.py", "--estimators", "reinforce_pp,ppo",
        "--seeds", "1", "--iterations", "2", "--out", str(tmp_path / "out"),
        "--results", str(tmp_path / "results.md"), "--", "--data.val_path", str(held_out),
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["iterations"] == 2 and figures["seeds"] == 1
    assert set(figures["estimators"]) == {"reinforce_pp", "ppo"}
    for name, row in figures["estimators"].items():
        for key in ("accuracy_before", "accuracy_after", "final_reward", "final_kl",
                    "reward_gain_per_kl", "final_response_length", "step_time_median_s",
                    "peak_rss_mb"):  # fmt: skip
            assert set(row[key]) == {"mean", "std"}, (name, key)
        assert 0 <= row["accuracy_after"]["mean"] <= 1
        assert row["peak_rss_mb"]["mean"] > 50  # a trainer with torch loaded: at least that
        assert [point[0] for point in row["held_out_curve"]] == [0, 1, 2]
        assert len(row["length_curve"]) == 2
        phases = row["phase_median_s"]
        assert {"generate", "logprobs", "update", "step"} <= set(phases)
        assert ("values" in phases) == (name == "ppo")  # only PPO pays for a critic
        assert row["step_time_vs_ppo"] > 0
    assert figures["estimators"]["ppo"]["step_time_vs_ppo"] == 1.0
    png = tmp_path / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results.md").read_text()
    assert "| reinforce_pp |" in table and "| ppo |" in table and "results.png" in table
    # cached: the runs are not repeated, the same figures come back at once
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["estimators"] == figures["estimators"]
