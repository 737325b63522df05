"""The quickstart's learning bar: held-out accuracy before → after, the curve, and the wall time.

Runs the README's command as a subprocess from the repository root, exactly as a newcomer
would; its logs and plot land in a new runs/quickstart/csv/version_N (named in the result):

    python benchmarks/quickstart.py                       # rpp-train fit --config quickstart.yaml
    python benchmarks/quickstart.py -- --model.rollout.max_iterations 5   # extra CLI overrides

Wall time covers everything the command does: start-up, starting the local generation and
reward servers, the evaluation before and after training, and training. It prints the curve
(from the CSV log) and, as its last line, one JSON object:
{"accuracy_before": ..., "accuracy_after": ..., "improvement_points": ..., "wall_s": ...}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"
_BEFORE_AFTER = re.compile(r"held-out accuracy ([\d.]+)% → ([\d.]+)%")
CURVE_KEYS = ("reward", "accuracy", "val/accuracy", "kl", "response_length", "time/step")


def read_curve(log_dir: Path) -> list[dict[str, float]]:
    """One row per training step (and per evaluation) of `metrics.csv`, only the keys we print."""
    rows = []
    with (log_dir / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            values = {k: float(row[k]) for k in ("step", *CURVE_KEYS) if row.get(k)}
            if len(values) > 1:
                rows.append(values)
    return rows


def run_quickstart(overrides: list[str]) -> tuple[str, float, int]:
    """Run the quickstart command from the repository root; return (output, wall s, exit code)."""
    argv = [sys.executable, "-m", "rpp_lightning.cli", "fit", "--config", str(CONFIG)]
    argv += ["--trainer.enable_progress_bar", "false", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=3600
    )
    wall_s = time.perf_counter() - start
    return result.stdout + result.stderr, wall_s, result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra rpp-train flags (after --)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    logs = ROOT / "runs" / "quickstart" / "csv"  # where configs/quickstart.yaml logs
    earlier = set(logs.iterdir()) if logs.exists() else set()
    output, wall_s, code = run_quickstart(args.overrides)
    if code != 0:
        print(output[-6000:], file=sys.stderr)
        print(json.dumps({"error": f"exit code {code}", "wall_s": round(wall_s, 1)}))
        return 1
    match = _BEFORE_AFTER.search(output)
    new = sorted(set(logs.iterdir()) - earlier) if logs.exists() else []
    if match is None or not new:
        print(output[-6000:], file=sys.stderr)
        print(json.dumps({"error": "no 'held-out accuracy' line or no new log directory"}))
        return 1
    log_dir = new[-1]
    curve = read_curve(log_dir)
    print("step  " + "  ".join(f"{k:>15}" for k in CURVE_KEYS))
    for row in curve:
        cells = [f"{row[k]:15.3f}" if k in row else " " * 15 for k in CURVE_KEYS]
        print(f"{int(row.get('step', -1)):4d}  " + "  ".join(cells))
    before, after = float(match.group(1)), float(match.group(2))
    steps = sum(1 for row in curve if "reward" in row)
    result = {
        "accuracy_before": before / 100,
        "accuracy_after": after / 100,
        "improvement_points": round(after - before, 1),
        "wall_s": round(wall_s, 1),
        "iterations": steps,
        "cpu_count": len(os.sched_getaffinity(0)),
        "load_avg_1m_at_start": round(load, 2),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "log_dir": str(log_dir.relative_to(ROOT)),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
