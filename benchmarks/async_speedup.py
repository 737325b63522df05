"""Rollouts that overlap training: the quickstart synchronous vs `rollout.max_staleness: 1`.

    python benchmarks/async_speedup.py                   # the quickstart's 300 iterations, each way
    python benchmarks/async_speedup.py --iterations 40   # a shorter look (accuracy means less)

On 2 cores the overlap is only visible when the two sides do not share them, so the trainer runs
pinned to one core and the servers to the other (`taskset`, one torch thread each): the
transformers generation server of the quickstart policy and the math reward server (scoring is
light next to generation; it rides on the servers' core). Both runs use the same servers, one
after the other, and the quickstart config unchanged but for the servers' addresses (and
`max_staleness`). Each run evaluates the held-out split before and after (greedy, 200 prompts).

Figures: the median iteration time of each run (`time/previous_iteration`: one whole iteration
with Lightning's loop, evaluations left out) and their ratio async/sync (the issue's goal ≤ 0.75);
held-out accuracy after the same number of iterations (goal: within 3 points of each other); the
mean staleness, the trainer's wait for rollouts and the generation server's idle time per
iteration. Then, on the same server, what a push costs a batch being generated: a quickstart
batch (32 prompts × 4 samples) alone, and with the policy's weights pushed while it runs (the
stream is received meanwhile; the swap waits for the batch): how much longer the batch took, and
how long after it the push returned (the swap). The last line is one JSON object with all of them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpp_lightning.clients.local_servers import (  # noqa: E402
    ChildServer,
    generation_server_argv,
    reward_server_argv,
)

CONFIG = ROOT / "configs" / "quickstart.yaml"
POLICY = ROOT / "assets" / "quickstart_policy"
_BEFORE_AFTER = re.compile(r"held-out accuracy ([\d.]+)% → ([\d.]+)%")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv]


def train(
    staleness: int, iterations: int, servers: dict[str, str], core: int, out: Path
) -> dict[str, float]:
    """One quickstart run against `servers`; its figures."""
    root = out / f"max_staleness_{staleness}"
    shutil.rmtree(root, ignore_errors=True)
    rewards = (f"[{{name: math, addresses: [{servers['math']}], local: null, "
               f"local_args: [], weight: 1.0, timeout_s: 60}}]")  # fmt: skip
    argv = [
        sys.executable, "-m", "rpp_lightning.cli", "fit", "--config", str(CONFIG),
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger", json.dumps([{
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(root), "name": "csv"},
        }]),
        "--model.export_dir", "null",
        "--model.generation.local", "false",
        "--model.generation.addresses", f"[{servers['generation']}]",
        "--model.rewards", rewards,
        "--model.rollout.max_iterations", str(iterations),
        "--model.rollout.max_staleness", str(staleness),
    ]  # fmt: skip
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        pinned(core, argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200
    )
    output = result.stdout + result.stderr
    match = _BEFORE_AFTER.search(output)
    if result.returncode != 0 or match is None:
        print(output[-6000:], file=sys.stderr)
        raise SystemExit(f"max_staleness {staleness}: exit {result.returncode}")
    metrics = next((root / "csv").iterdir()) / "metrics.csv"
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("policy_loss")]

    def median(key: str) -> float:
        return statistics.median(float(r[key]) for r in rows if r.get(key))

    def mean(key: str) -> float:
        return statistics.fmean(float(r[key]) for r in rows if r.get(key))

    return {
        "iterations": len(rows),
        "iteration_s": median("time/previous_iteration"),
        "generate_s": median("time/generate"),
        "update_s": median("time/update"),
        "rollout_wait_s": median("time/rollout_wait"),
        "generation_idle_s": median("time/generation_idle"),
        "staleness_mean": mean("staleness"),
        "staleness_max": max(float(r["staleness/max"]) for r in rows),
        "refused": sum(float(r["staleness/refused"]) for r in rows),
        "accuracy_before": float(match.group(1)),
        "accuracy_after": float(match.group(2)),
    }


def push_stall(address: str, repeats: int = 5) -> dict[str, float]:
    """Median seconds: a batch alone, the same batch with a push during it, and the push's
    return after the batch ended."""
    import threading
    import time

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from rpp_lightning.clients.generation import GenerationClient, SamplingConfig

    tokenizer = AutoTokenizer.from_pretrained(POLICY)
    prompts = [tokenizer(f"Calculate {a} + {a + 7}.").input_ids for a in range(32)]
    state = load_file(str(POLICY / "model.safetensors"))
    sampling = SamplingConfig(n=4, max_new_tokens=12, seed=0)
    alone, together, swap = [], [], []
    with GenerationClient([address]) as client:
        client.wait_until_ready()
        for _ in range(repeats):
            version = client.version
            start = time.perf_counter()
            client.generate(prompts, sampling, expected_version=version)
            alone.append(time.perf_counter() - start)
            returned: list[float] = []

            def push(new_version: int = version + 1, returned: list[float] = returned) -> None:
                time.sleep(0.05)  # the batch is running by then
                client.push_weights(state, new_version)
                returned.append(time.perf_counter())

            pusher = threading.Thread(target=push)
            start = time.perf_counter()
            pusher.start()
            client.generate(prompts, sampling, expected_version=version)
            ended = time.perf_counter()
            pusher.join()
            together.append(ended - start)
            swap.append(returned[0] - ended)
    return {
        "batch_alone_s": statistics.median(alone),
        "batch_with_push_s": statistics.median(together),
        "push_returned_after_batch_s": statistics.median(swap),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="the quickstart's: 300")
    parser.add_argument("--trainer-core", type=int, default=0)
    parser.add_argument("--servers-core", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "async_speedup")
    args = parser.parse_args()
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin the processes to cores")
    core = args.servers_core
    generation = ChildServer(
        pinned(core, generation_server_argv(str(POLICY))), name="generation", env=ONE_THREAD,
        wait=False,
    )  # fmt: skip
    math = ChildServer(
        pinned(core, reward_server_argv("math", ["--verifier-args", "workers=1"])),
        name="math", env=ONE_THREAD, wait=False,
    )  # fmt: skip
    try:
        generation.wait_ready()
        math.wait_ready()
        servers = {"generation": generation.address, "math": math.address}
        runs = {}
        for staleness in (0, 1):
            runs[staleness] = train(
                staleness, args.iterations, servers, args.trainer_core, args.out
            )
            print(f"max_staleness {staleness}: {json.dumps(runs[staleness])}", flush=True)
        stall = push_stall(servers["generation"])
        print(f"a push during a batch: {json.dumps(stall)}", flush=True)
    finally:
        generation.stop()
        math.stop()
    sync, overlapped = runs[0], runs[1]
    result = {
        "iterations": args.iterations,
        "iteration_time_ratio_async_over_sync": round(
            overlapped["iteration_s"] / sync["iteration_s"], 3
        ),
        "held_out_accuracy_sync": sync["accuracy_after"],
        "held_out_accuracy_async": overlapped["accuracy_after"],
        "held_out_accuracy_before": sync["accuracy_before"],
        "accuracy_gap_points": round(overlapped["accuracy_after"] - sync["accuracy_after"], 1),
        "sync": sync,
        "async": overlapped,
        "push_during_a_batch": stall,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
