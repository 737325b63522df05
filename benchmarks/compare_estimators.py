"""REINFORCE++ beside PPO, GRPO, RLOO and REINFORCE++-baseline on the quickstart task.

    python benchmarks/compare_estimators.py                       # 5 estimators × 3 seeds
    python benchmarks/compare_estimators.py --estimators reinforce_pp,ppo --seeds 1 --iterations 2
    python benchmarks/compare_estimators.py -- --data.val_path my_val.jsonl   # extra flags

Every run is the quickstart command (`rpp-train fit --config configs/quickstart.yaml`) with one
estimator, one seed and `--iterations`; a seed fixes the data order, the sampling and the
initialisation alike, so estimators with the same seed see the same prompts in the same order
and the same number of samples. Runs are cached under `--out` (`<estimator>/seed<k>/run.json`):
an interrupted comparison resumes where it stopped, and a finished run is never run again.

It writes `<out>/comparison.json`, `<out>/comparison.png` (held-out accuracy by iteration,
reward against KL, response length by iteration, bands over seeds), and `docs/results.md`
(with `--results`), a table generated from the JSON. The last line printed is the JSON object.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"
ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline", "grpo", "rloo", "ppo")
_BEFORE_AFTER = re.compile(r"held-out accuracy ([\d.]+)% → ([\d.]+)%")
TAIL = 0.1  # "at the end" = the mean over the last 10% of iterations (rollout metrics are noisy)
PHASES = ("generate", "score_wait", "logprobs", "values", "update", "weight_sync", "step")


def run_dir(out: Path, estimator: str, seed: int) -> Path:
    return out / estimator / f"seed{seed}"


def train_once(
    out: Path, estimator: str, seed: int, iterations: int, timeout_s: int, overrides: list[str]
) -> Path:
    """Run the quickstart with one estimator and seed (unless cached); return its run.json."""
    where = run_dir(out, estimator, seed)
    done = where / "run.json"
    if done.exists():
        return done
    shutil.rmtree(where, ignore_errors=True)  # an interrupted run starts over
    where.mkdir(parents=True)
    val_every = max(1, iterations // 4)  # the held-out curve: 4 points between before and after
    csv_logger = "lightning.pytorch.loggers.CSVLogger"
    logger = f"[{{class_path: {csv_logger}, init_args: {{save_dir: {where}, name: csv}}}}]"
    argv = [
        sys.executable, "-m", "rpp_lightning.cli", "fit", "--config", str(CONFIG),
        "--model.algorithm.advantage_estimator", estimator,
        "--model.rollout.max_iterations", str(iterations),
        "--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed),
        "--trainer.val_check_interval", str(val_every),
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(where),
        "--trainer.logger", logger,
        "--model.export_dir", "null",
        *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    with (where / "output.log").open("w") as log:
        code = subprocess.run(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False,
        ).returncode  # fmt: skip
    wall_s = time.perf_counter() - start
    output = (where / "output.log").read_text()
    match = _BEFORE_AFTER.search(output)
    if code != 0 or match is None:
        raise RuntimeError(f"{estimator} seed {seed} failed (exit {code}):\n{output[-4000:]}")
    (log_dir,) = (where / "csv").iterdir()
    run = summarise_run(log_dir / "metrics.csv", iterations, val_every)
    run.update(
        accuracy_before=float(match.group(1)) / 100,
        accuracy_after=float(match.group(2)) / 100,
        wall_s=round(wall_s, 1),
    )
    done.write_text(json.dumps(run))
    return done


def summarise_run(metrics_csv: Path, iterations: int, val_every: int) -> dict:
    """One run's figures from its metrics.csv: curves, end values, median phase times."""
    with metrics_csv.open() as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    train = sorted((r for r in rows if "policy_loss" in r), key=lambda r: r["step"])
    # Lightning logs evaluations at its global step (optimizer steps); the k-th one ran after
    # iteration k × val_every
    evaluations = sorted((r["step"], r["val/accuracy"]) for r in rows if "val/accuracy" in r)
    held_out = [[(k + 1) * val_every, acc] for k, (_, acc) in enumerate(evaluations)]
    if len(train) != iterations:
        raise RuntimeError(f"{metrics_csv}: {len(train)} training rows, expected {iterations}")
    tail = max(1, round(TAIL * iterations))
    head_reward = statistics.fmean(r["reward"] for r in train[:tail])
    end = {k: statistics.fmean(r[k] for r in train[-tail:]) for k in ("reward", "kl_x_length")}
    gain = end["reward"] - head_reward
    return {
        "iterations": iterations,
        "reward_curve": [r["reward"] for r in train],
        "kl_curve": [r["kl_x_length"] for r in train],
        "length_curve": [r["response_length"] for r in train],
        "held_out_curve": held_out,
        "final_reward": end["reward"],
        "final_kl": end["kl_x_length"],
        "reward_gain": gain,
        # the paper's "reward per unit KL": reward gained over the run / KL to the reference
        # (per response) at its end
        "reward_gain_per_kl": gain / end["kl_x_length"] if end["kl_x_length"] > 0 else math.nan,
        "final_response_length": statistics.fmean(r["response_length"] for r in train[-tail:]),
        "step_time_median_s": statistics.median(r["time/step"] for r in train),
        "phase_median_s": {
            p: statistics.median(r[f"time/{p}"] for r in train)
            for p in PHASES
            if f"time/{p}" in train[0]
        },
        "peak_rss_mb": max(r["memory/peak_rss_mb/max"] for r in train),
    }


def held_out_curve(run: dict) -> list[tuple[int, float]]:
    """(iterations done, held-out accuracy): before training, every evaluation, after."""
    n = run["iterations"]
    periodic = [(x, acc) for x, acc in run["held_out_curve"] if x < n]  # n: the "after" one
    return [(0, run["accuracy_before"]), *periodic, (n, run["accuracy_after"])]


def mean_std(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std}


SCALARS = (
    "accuracy_before", "accuracy_after", "final_reward", "final_kl", "reward_gain",
    "reward_gain_per_kl", "final_response_length", "step_time_median_s", "peak_rss_mb", "wall_s",
)  # fmt: skip


def aggregate(runs: dict[str, list[dict]]) -> dict:
    """Mean ± std over seeds per estimator, and each one's step time relative to PPO's."""
    table = {}
    for estimator, seeds in runs.items():
        row = {key: mean_std([run[key] for run in seeds]) for key in SCALARS}
        phases = seeds[0]["phase_median_s"].keys()
        row["phase_median_s"] = {
            p: statistics.fmean(run["phase_median_s"][p] for run in seeds) for p in phases
        }
        row["seeds"] = len(seeds)
        curves = [held_out_curve(run) for run in seeds]
        # the held-out curve: [iterations done, mean accuracy], before (0) and after (n)
        row["held_out_curve"] = [
            [x, statistics.fmean(curve[i][1] for curve in curves)]
            for i, (x, _) in enumerate(curves[0])
        ]
        row["length_curve"] = [
            statistics.fmean(col) for col in zip(*(r["length_curve"] for r in seeds), strict=True)
        ]
        table[estimator] = row
    if "ppo" in table:
        ppo_step = table["ppo"]["step_time_median_s"]["mean"]
        for row in table.values():
            row["step_time_vs_ppo"] = row["step_time_median_s"]["mean"] / ppo_step
    return table


def _band(ax, x, curves, label) -> None:
    import numpy as np

    data = np.array(curves, dtype=float)
    mean, std = data.mean(0), data.std(0)
    (line,) = ax.plot(x, mean, label=label)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out = []
    for end in range(1, len(values) + 1):
        recent = values[max(0, end - window) : end]
        out.append(sum(recent) / len(recent))
    return out


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """Accuracy by iteration, reward against KL, length by iteration; bands = ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, rkl, length) = plt.subplots(1, 3, figsize=(16, 4.6))
    for estimator, seeds in runs.items():
        n = seeds[0]["iterations"]
        curves = [held_out_curve(run) for run in seeds]
        xs = [x for x, _ in curves[0]]
        _band(acc, xs, [[100 * a for _, a in curve] for curve in curves], estimator)
        rewards = [_smooth(run["reward_curve"]) for run in seeds]
        kls = [_smooth(run["kl_curve"]) for run in seeds]
        mean_kl = [statistics.fmean(col) for col in zip(*kls, strict=True)]
        mean_reward = [statistics.fmean(col) for col in zip(*rewards, strict=True)]
        rkl.plot(mean_kl, mean_reward, label=estimator)
        _band(length, range(1, n + 1), [_smooth(run["length_curve"]) for run in seeds], estimator)
    acc.set(title="held-out greedy accuracy", xlabel="iteration", ylabel="accuracy (%)")
    rkl.set(title="reward vs KL to the reference (10-iteration mean)",
            xlabel="KL per response (k1 × length)", ylabel="reward")  # fmt: skip
    length.set(title="response length", xlabel="iteration", ylabel="tokens (10-iteration mean)")
    for ax in (acc, rkl, length):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(stat: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def results_markdown(table: dict, command: str, seeds: int, iterations: int, png: str) -> str:
    """docs/results.md: the table generated from the comparison's JSON."""
    lines = [
        "# How the estimators compare (generated)",
        "",
        "Generated by `benchmarks/compare_estimators.py` from its JSON; do not edit by hand.",
        f"Command: `{command}`",
        "",
        f"The quickstart task (a 1.8M-parameter Llama, arithmetic, math-verify reward), "
        f"{iterations} iterations of 32 prompts × 4 samples, {seeds} seed(s) per estimator "
        f"(mean ± std over seeds). Same prompts, order and sample count for every estimator.",
        "",
        "| estimator | held-out acc. before → after (%) | final reward | final KL | "
        "reward gain / KL | final length | median step (s) | step vs PPO | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in table.items():
        ratio = row.get("step_time_vs_ppo")
        lines.append(
            f"| {name} | {_cell(row['accuracy_before'], 100, 1)} → "
            f"{_cell(row['accuracy_after'], 100, 1)} | {_cell(row['final_reward'])} | "
            f"{_cell(row['final_kl'], digits=4)} | {_cell(row['reward_gain_per_kl'])} | "
            f"{_cell(row['final_response_length'], digits=2)} | "
            f"{_cell(row['step_time_median_s'])} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {_cell(row['peak_rss_mb'], digits=0)} |"
        )
    phases = sorted({p for row in table.values() for p in row["phase_median_s"]})
    lines += [
        "",
        "Median phase times (s, mean over seeds):",
        "",
        "| estimator | " + " | ".join(phases) + " |",
        "| --- |" + " --- |" * len(phases),
    ]
    for name, row in table.items():
        cells = [f"{row['phase_median_s'][p]:.3f}" if p in row["phase_median_s"] else "—"
                 for p in phases]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Final reward, KL and length are means over the last 10% of iterations; KL is the k1 "
        "estimate of KL(π_old ‖ π_ref) summed over a response; reward gain / KL is (final reward "
        "− reward of the first 10% of iterations) / final KL.",
        "",
        f"![accuracy, reward vs KL, length]({png})",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per estimator")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--results", type=Path, default=None,
                        help="write the markdown table here (e.g. docs/results.md)")  # fmt: skip
    parser.add_argument("--timeout-s", type=int, default=3600, help="per run")
    parser.add_argument(
        "overrides", nargs="*", help="extra rpp-train flags for every run (after --)"
    )
    args = parser.parse_args()
    estimators = [e for e in args.estimators.split(",") if e]
    unknown = sorted(set(estimators) - set(ESTIMATORS))
    if unknown:
        parser.error(f"unknown estimators {unknown}; valid: {', '.join(ESTIMATORS)}")
    out = args.out / f"iter{args.iterations}"
    if args.overrides:  # other settings, other runs: cached apart
        out = out.with_name(
            out.name + "-" + hashlib.sha1(" ".join(args.overrides).encode()).hexdigest()[:8]
        )
    runs: dict[str, list[dict]] = {e: [] for e in estimators}
    for seed in range(args.seeds):  # seed-major: a partial comparison covers every estimator
        for estimator in estimators:
            path = train_once(out, estimator, seed, args.iterations, args.timeout_s, args.overrides)
            run = json.loads(path.read_text())
            runs[estimator].append(run)
            print(
                f"{estimator:>22} seed {seed}: accuracy {100 * run['accuracy_before']:.1f}% → "
                f"{100 * run['accuracy_after']:.1f}%, step {run['step_time_median_s']:.3f} s, "
                f"reward gain/KL {run['reward_gain_per_kl']:.3f}",
                flush=True,
            )
    table = aggregate(runs)
    png = out / "comparison.png"
    plot(runs, png)
    command = "python benchmarks/compare_estimators.py " + " ".join(sys.argv[1:])
    result = {
        "command": command.strip(),
        "iterations": args.iterations,
        "seeds": args.seeds,
        "estimators": table,
        "plot": str(png),
    }
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        figure = args.results.with_suffix(".png")  # beside the table, to be committed with it
        shutil.copyfile(png, figure)
        markdown = results_markdown(
            table, command.strip(), args.seeds, args.iterations, figure.name
        )
        args.results.write_text(markdown)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
