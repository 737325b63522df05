"""Where a training step's time goes, for configs/tiny.yaml on this machine.

    python benchmarks/step_breakdown.py --iterations 8
    python benchmarks/step_breakdown.py --iterations 12 --peer-shapes --checkpoints  # issue 17

Runs `rpp-train fit --config configs/tiny.yaml` (local generation and math reward servers, real
gRPC) in a temporary directory, reads the per-phase timings the trainer logs every step, and
reports medians over the iterations after the first (warm-up). An iteration is measured whole,
from one training step's start to the next (`time/previous_iteration`): the phases, the logging of
its metrics, callbacks and Lightning's loop.

Two shares of it are reported:
- `overhead_fraction` (goal ≤ 0.10): what serving rollouts and rewards over gRPC costs: transport
  and serialisation of the generate and score calls (the caller's wall time minus the time the
  server reports in its `rpp-server-ms` trailer) and the weight push;
- `non_model_fraction`: that plus the trainer's own bookkeeping (packing the rollouts, reward
  shaping and advantages, metrics, logging, callbacks, Lightning's loop): everything that is
  neither model nor reward compute.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from peer_speed import PEER_SHAPES  # benchmarks/ is on the path when run as a script

ROOT = Path(__file__).resolve().parent.parent
PHASES = ["generate", "logprobs", "score_wait", "update", "weight_sync"]
"""What the trainer waits for, in order; scoring runs during logprobs (time/score: its own wall)."""


def run(
    config: str, iterations: int, extra: list[str], checkpoints: bool = False
) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        # run from the repository (the config's relative paths), log into the temporary dir
        logger = (
            f"[{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp}}}}}]"
        )
        argv = [
            sys.executable, "-m", "rpp_lightning.cli", "fit",
            "--config", str(ROOT / config),
            "--model.rollout.max_iterations", str(iterations),
            "--trainer.val_check_interval", "null",
            "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false",
            *([] if checkpoints else ["--trainer.enable_checkpointing", "false",
                                      "--trainer.callbacks", "[]"]),
            "--trainer.logger", logger,
            "--model.export_dir", "null",
            "--model.evaluate_before_after", "false",
            *extra,
        ]  # fmt: skip
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
        (metrics,) = Path(tmp).glob("lightning_logs/*/metrics.csv")
        with metrics.open() as f:
            rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    return [r for r in rows if "time/step" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="relative to the repo")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument(
        "--peer-shapes",
        action="store_true",
        help="the shapes of benchmarks/peer_speed.py (TRL's comparison)",
    )
    parser.add_argument(
        "--checkpoints",
        action="store_true",
        help="keep the config's checkpoint callback (tiny: every iteration)",
    )
    parser.add_argument("extra", nargs="*", help="extra rpp-train overrides")
    args = parser.parse_args()
    extra = [*(PEER_SHAPES if args.peer_shapes else []), *args.extra]
    rows = run(args.config, args.iterations, extra, args.checkpoints)
    # Row k + 1 carries iteration k's whole wall time; the first iteration warms up.
    for row, later in itertools.pairwise(rows):
        row["iteration"] = later["time/previous_iteration"]
    rows = rows[1:-1]
    # Per iteration first, then the median: medians of separate columns would not add up.
    for row in rows:
        for call in ("generate", "score"):
            row[f"{call}_transport"] = max(0.0, row[f"time/{call}"] - row[f"time/{call}_server"])
        # scoring overlaps the log-probs: only what the trainer still waited for can be transport
        row["score_transport"] = min(row["score_transport"], row["time/score_wait"])
        row["transport"] = row["generate_transport"] + row["score_transport"]
        row["bookkeeping"] = max(0.0, row["iteration"] - sum(row[f"time/{p}"] for p in PHASES))
        row["outside_step"] = row["iteration"] - row["time/step"]
        overhead = row["transport"] + row["time/weight_sync"]
        row["overhead_fraction"] = overhead / row["iteration"]
        row["non_model_fraction"] = (overhead + row["bookkeeping"]) / row["iteration"]
    middle = sorted(rows, key=lambda r: r["overhead_fraction"])[len(rows) // 2]
    median = {key: middle[f"time/{key}"] for key in [*PHASES, "score"]}
    median["step"] = middle["iteration"]
    transport, other = middle["transport"], middle["bookkeeping"]
    fractions = [r["overhead_fraction"] for r in rows]
    non_model = sorted(r["non_model_fraction"] for r in rows)[len(rows) // 2]
    print(f"the median iteration (by overhead) of {len(rows)} after 1 warm-up, {args.config}")
    print("  (an iteration: one training step start to the next, logging and the loop included)")
    for phase in PHASES:
        share = median[phase] / median["step"]
        print(f"  {phase:<12} {median[phase] * 1000:8.1f} ms  {100 * share:5.1f} %")
    print(f"  {'iteration':<12} {median['step'] * 1000:8.1f} ms")
    print(
        f"  scoring ran {median['score'] * 1000:.1f} ms alongside the log-probs; the trainer "
        f"waited {median['score_wait'] * 1000:.1f} ms for it afterwards"
    )
    print(
        f"  transport (wall − server time) {transport * 1000:.1f} ms: generate "
        f"{middle['generate_transport'] * 1000:.1f}, score {middle['score_transport'] * 1000:.1f}"
    )
    print(
        f"  bookkeeping {other * 1000:.1f} ms, of which after the step (logging, callbacks, "
        f"Lightning's loop) {middle['outside_step'] * 1000:.1f} ms"
    )
    print(f"  overhead fraction (gRPC, serialisation, weight push) "
          f"{middle['overhead_fraction']:.3f} (goal ≤ 0.10); "
          f"all iterations: {', '.join(f'{f:.3f}' for f in fractions)}")  # fmt: skip
    print(f"  with the trainer's bookkeeping and Lightning's loop (median): {non_model:.3f}")
    print(
        json.dumps(
            {
                "step_s": median["step"],
                "generate_s": median["generate"],
                "score_s": median["score"],
                "score_wait_s": median["score_wait"],
                "logprobs_s": median["logprobs"],
                "update_s": median["update"],
                "weight_push_s": median["weight_sync"],
                "transport_s": transport,
                "bookkeeping_s": other,
                "outside_step_s": middle["outside_step"],
                "overhead_fraction": middle["overhead_fraction"],
                "overhead_fraction_max": max(fractions),
                "non_model_fraction": non_model,
                "iterations": len(rows),
                "config": args.config,
            }
        )
    )


if __name__ == "__main__":
    main()
