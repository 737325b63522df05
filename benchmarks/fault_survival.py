"""Faults injected into a real tiny training run, what the run lost, and a bounded load test.

    python benchmarks/fault_survival.py                      # the schedule, then 60 s of load
    python benchmarks/fault_survival.py --load-seconds 0     # the schedule only
    python benchmarks/fault_survival.py --load-seconds 0 --weight-transport collective

The schedule: one run of `configs/tiny.yaml` (its built-in math-verify reward, a transformers
generation server, both started here as real processes on loopback ports), through five trainer
processes, each resuming from what the previous one left:

  segment 1, from scratch, reward replicas A and B:
    after iteration 2  SIGKILL reward replica B (it stays dead)              replica lost
    after iteration 4  SIGKILL the generation server; a fresh one takes its
                       port at weights version 0                             generation restart
    after iteration 6  SIGKILL reward replica A; back 3 s later              outage < budget
    after iteration 8  SIGKILL reward replica A for good: the trainer
                       checkpoints and exits 75                              outage > budget
  segment 2, resumed with a reward server that answers NaN: exits 75         misbehaving server
  segment 3, resumed with a good reward server, checkpoints every 2
             iterations; SIGKILL the trainer after 3 more iterations         trainer crash
  segment 4, resumed from last.ckpt; SIGKILL the trainer when a checkpoint
             write is seen in progress (else after 2 iterations)             crash during a save
  segment 5, resumed from last.ckpt, runs to the end                         completed

What it measures, from the trainers' metrics and checkpoints (not assumed): each segment's first
iteration against the iteration stored in the checkpoint it resumed from (equal: nothing trained
twice or skipped), iterations lost (run by a killed trainer after its last checkpoint, run
again), and every iteration's rollouts against the trainer's weights version.

The load test: 8 client threads call one math server (concurrency limit 4) for 60 s: every call
is answered or refused with RESOURCE_EXHAUSTED, none hangs, and the server's memory stays
bounded; p50/p99 latency and throughput are reported. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "arithmetic"
SAMPLES_PER_ITERATION = 8  # tiny.yaml: 4 prompts × 2 samples
EXIT_SERVER_FAILURE = 75
REFUSED_OR_OK = ("OK", "RESOURCE_EXHAUSTED")


def _server(argv: list[str], name: str, wait: bool):
    from rpp_lightning.clients.local_servers import ChildServer

    return ChildServer([sys.executable, "-m", *argv], name=name, cwd=str(ROOT), wait=wait)


def math_server(port: int = 0, *extra: str, wait: bool = True):
    argv = ["reward_servers.cli", "math", "--port", str(port), "--verifier-args", "workers=1"]
    return _server([*argv, *extra], "math", wait)


def generation_server(model: Path, port: int = 0, wait: bool = True):
    argv = ["rpp_lightning.generation.cli", "--model", str(model), "--port", str(port)]
    return _server(argv, "generation", wait)


def _port(server) -> int:
    return int(server.address.rsplit(":", 1)[1])


class NanRewardServer:
    """A reward server implementing the proto badly: every reward is NaN (real gRPC)."""

    def __init__(self) -> None:
        from rpp_lightning.proto import reward_pb2, reward_pb2_grpc
        from rpp_lightning.rpc.server_config import ServerConfig
        from rpp_lightning.rpc.serving import GrpcServer, ServiceSpec

        class Servicer(reward_pb2_grpc.RewardServiceServicer):
            def GetInfo(self, request, context):
                return reward_pb2.RewardServerInfo(name="nan", kind="verifier")

            def Score(self, request, context):
                nan = float("nan")
                scores = [reward_pb2.Score(id=s.id, reward=nan) for s in request.samples]
                return reward_pb2.ScoreResponse(scores=scores)

        add = reward_pb2_grpc.add_RewardServiceServicer_to_server
        spec = ServiceSpec(Servicer(), add, "rpp.v1.RewardService")
        self.server = GrpcServer(ServerConfig(port=0), [spec])
        self.address = f"127.0.0.1:{self.server.start()}"

    def stop(self) -> None:
        self.server.stop(grace=0)


class Trainer:
    """One `rpp-train fit` process on configs/tiny.yaml, in its own directory."""

    def __init__(self, cwd: Path, overrides: list[str]) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.cwd = cwd
        argv = [
            sys.executable, "-m", "rpp_lightning.cli", "fit",
            "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--data.train_path", str(DATA / "train.jsonl"), "--data.val_path", "null",
            "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "null",
            "--trainer.limit_val_batches", "0", "--model.export_dir", "null",
            *overrides,
        ]  # fmt: skip
        self.log = (cwd / "trainer.log").open("w")
        env = dict(os.environ)
        if Path("/dev/shm").is_dir():  # temporary files on another file system than the
            env["TMPDIR"] = "/dev/shm"  # checkpoints, as on a cluster: the final copy is visible
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )

    def rows(self) -> list[dict[str, float]]:
        """The iterations logged so far (metrics.csv rows with a policy loss)."""
        found = sorted((self.cwd / "runs" / "tiny" / "csv").glob("*/metrics.csv"))
        if not found:
            return []
        try:
            with found[-1].open() as f:
                rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
        except (OSError, ValueError):  # being written
            return []
        return [row for row in rows if "policy_loss" in row]

    def wait_rows(self, count: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.rows()) < count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trainer exited ({self.proc.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer logged {len(self.rows())} < {count} iterations")
            time.sleep(0.05)

    def checkpoints(self) -> Path:
        return next((self.cwd / "runs" / "tiny" / "csv").glob("*/checkpoints"))

    def wait(self, timeout_s: float = 300) -> int:
        code = self.proc.wait(timeout_s)
        self.log.close()
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.cwd / "trainer.log").read_text()


def checkpoint_iteration(path: Path) -> int:
    """The iteration a checkpoint resumes at (ReinforcePP saves it under "rpp")."""
    import torch

    return int(torch.load(path, weights_only=False, map_location="cpu")["rpp"]["iteration"])


def _kill_during_save(trainer: Trainer, iterations: int) -> bool:
    """SIGKILL `trainer` while a checkpoint write is in progress (a file in its checkpoint
    directory that is not yet a finished `.ckpt`); after `iterations` logged rows if none is
    seen. Returns whether the kill landed during a write."""
    start = len(trainer.rows())
    directory = None
    while len(trainer.rows()) < start + iterations and trainer.proc.poll() is None:
        try:
            directory = directory or trainer.checkpoints()
            if any(not p.name.endswith(".ckpt") for p in directory.iterdir()):
                trainer.kill()
                return True
        except (StopIteration, FileNotFoundError):
            pass
        time.sleep(0.0005)
    trainer.kill()
    return False


def schedule(
    work: Path, iterations: int = 16, budget_s: float = 15.0, weight_transport: str = "auto"
) -> dict:
    """Run the fault schedule of the module docstring; return what it measured. Segments 1-4
    take about 13 iterations: `iterations` must leave segment 4 a few more (16 does).
    `weight_transport`: how the trainers push (`auto` is shared memory here, all on one host;
    `collective` re-joins the restarted generation server's group)."""
    if iterations < 16:
        raise ValueError(f"the schedule needs at least 16 iterations, got {iterations}")
    from rpp_lightning.tiny import save_tiny_causal_lm

    # 0.8M parameters (tiny.yaml's is 40k): a checkpoint write then lasts long enough (~10 MB)
    # for segment 4 to see it in progress and kill the trainer during it
    model = save_tiny_causal_lm(work / "policy", hidden_size=128, num_layers=4)
    generation = generation_server(model, wait=False)  # the three start side by side
    replica_a, replica_b = math_server(wait=False), math_server(wait=False)
    started = [generation, replica_a, replica_b]
    for server in started:
        server.wait_ready()
    addresses = {"generation": generation.address, "a": replica_a.address, "b": replica_b.address}
    segments, faults = [], []

    def overrides(rewards: list[str], *extra: str) -> list[str]:
        return [
            "--model.policy.config", "null", "--model.policy.tokenizer", "null",
            "--model.policy.path", str(model),
            "--model.generation.local", "false",
            "--model.generation.addresses", f"[{generation.address}]",
            "--model.generation.weight_transport", weight_transport,
            "--model.rewards",
            f"[{{name: math, addresses: [{', '.join(rewards)}], local: null, local_args: []}}]",
            "--model.rollout.max_iterations", str(iterations),
            "--model.failure_policy.retry_budget_s", str(budget_s),
            "--model.failure_policy.revive_after_s", "600",
            *extra,
        ]  # fmt: skip

    def every(n: int) -> list[str]:
        callback = "{class_path: rpp_lightning.trainer.checkpoints.IterationCheckpoint, "
        return ["--trainer.callbacks", f"[{callback}init_args: {{every_n_iterations: {n}}}}}]"]

    try:
        # segment 1: four server faults
        one = Trainer(work / "s1", overrides([replica_a.address, replica_b.address]))
        one.wait_rows(2)
        replica_b.proc.kill()
        faults.append("reward replica SIGKILL")
        one.wait_rows(4)
        generation.proc.kill()
        generation.proc.wait()
        generation = generation_server(model, _port(generation))
        started.append(generation)
        faults.append("generation server restart")
        one.wait_rows(6)
        replica_a.proc.kill()
        replica_a.proc.wait()
        time.sleep(3)
        replica_a = math_server(_port(replica_a))
        started.append(replica_a)
        faults.append("reward outage < budget")
        one.wait_rows(8)
        replica_a.proc.kill()
        faults.append("reward outage > budget")
        segments.append(_segment(one, expect=EXIT_SERVER_FAILURE))
        # segment 2: a reward server that answers NaN
        bad = NanRewardServer()
        resume = ["--ckpt_path", segments[-1]["checkpoint"]]
        two = Trainer(work / "s2", overrides([bad.address], *resume))
        faults.append("misbehaving reward server")
        segments.append(_segment(two, EXIT_SERVER_FAILURE, segments[-1]["checkpoint"]))
        bad.stop()
        # segment 3: the trainer SIGKILLed mid-run (checkpoints every 2 iterations)
        good = math_server()
        started.append(good)
        resume = ["--ckpt_path", segments[-1]["checkpoint"]]
        three = Trainer(work / "s3", overrides([good.address], *resume, *every(2)))
        three.wait_rows(3)
        three.kill()
        faults.append("trainer SIGKILL")
        segments.append(_segment(three, -signal.SIGKILL, segments[-1]["checkpoint"]))
        # segment 4: the trainer SIGKILLed during a checkpoint save
        resume = ["--ckpt_path", segments[-1]["checkpoint"]]
        four = Trainer(work / "s4", overrides([good.address], *resume))
        four.wait_rows(1)
        during_save = _kill_during_save(four, iterations=3)
        faults.append("trainer SIGKILL during a checkpoint save")
        segments.append(_segment(four, -signal.SIGKILL, segments[-1]["checkpoint"]))
        segments[-1]["killed_during_save"] = during_save
        # segment 5: to the end
        resume = ["--ckpt_path", segments[-1]["checkpoint"]]
        five = Trainer(work / "s5", overrides([good.address], *resume))
        segments.append(_segment(five, 0, segments[-1]["checkpoint"]))
    finally:
        for server in started:
            if server.proc.poll() is None:
                server.stop(timeout_s=5)
    return {**_account(segments, faults, iterations), "addresses": addresses}


def _segment(trainer: Trainer, expect: int, resumed_from: str | None = None) -> dict:
    code = trainer.wait()
    output = trainer.output()
    if code != expect:
        raise RuntimeError(f"trainer exited {code}, expected {expect}:\n{output[-6000:]}")
    rows = trainer.rows()
    saved = [line for line in output.splitlines() if "; saved " in line]
    if saved:  # an exit on a server failure names the checkpoint it saved
        checkpoint = saved[-1].split("; saved ", 1)[1].split(" ", 1)[0]
    else:  # killed: what its last.ckpt names, or (none written yet) where it started from
        last = trainer.cwd / "runs" / "tiny" / "csv"
        found = sorted(last.glob("*/checkpoints/last.ckpt"))
        checkpoint = str(found[-1]) if found else resumed_from
    return {
        "exit": code,
        "steps": [int(r["step"]) for r in rows],
        "versions": [(r["weights_version/rollouts"], r["weights_version"]) for r in rows],
        "checkpoint": checkpoint,
        "checkpoint_iteration": checkpoint_iteration(Path(checkpoint)) if checkpoint else None,
        "output": output,
    }


def _account(segments: list[dict], faults: list[str], iterations: int) -> dict:
    twice = skipped = lost = 0
    for done, after in itertools.pairwise(segments):
        resumed_at = done["checkpoint_iteration"]
        first = after["steps"][0] if after["steps"] else resumed_at
        twice += max(0, resumed_at - first)
        skipped += max(0, first - resumed_at)
        ran_to = done["steps"][-1] + 1 if done["steps"] else resumed_at
        lost += max(0, ran_to - resumed_at)  # run by the killed trainer, run again
    wrong_weights = sum(
        rollouts != trainer - 1 for seg in segments for rollouts, trainer in seg["versions"]
    )
    final = segments[-1]
    return {
        "faults_injected": len(faults),
        "faults": faults,
        "runs_completed": int(final["exit"] == 0 and final["steps"][-1] == iterations - 1),
        "iterations_lost": lost,
        "samples_trained_twice": twice * SAMPLES_PER_ITERATION,
        "samples_skipped": skipped * SAMPLES_PER_ITERATION,
        "iterations_from_wrong_weights": int(wrong_weights),
        "killed_during_save": bool(segments[3].get("killed_during_save")),
        "segments": [{k: v for k, v in s.items() if k != "output"} for s in segments],
        "outputs": [s["output"] for s in segments],
    }


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the verifier's workers, which a
    fork server started, are grandchildren), in MiB."""
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:  # it ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def load_test(seconds: float, clients: int = 8, limit: int = 4, samples: int = 32) -> dict:
    """`clients` threads call one math server (`limit` calls at a time) for `seconds`."""
    import grpc

    from rpp_lightning.proto import reward_pb2, reward_pb2_grpc

    server = math_server(0, "--max-concurrent-rpcs", str(limit))
    request = reward_pb2.ScoreRequest(
        samples=[
            reward_pb2.Sample(id=str(i), prompt=f"{i}+{i}=", response=str(2 * i), reference="2")
            for i in range(samples)
        ]
    )  # fmt: skip
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            while time.monotonic() < stop:
                start = time.perf_counter()
                try:
                    stub.Score(request, timeout=30)
                    outcome = "OK"
                except grpc.RpcError as exc:
                    outcome = exc.code().name
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    if outcome == "OK":
                        latencies.append(time.perf_counter() - start)
                if outcome == "RESOURCE_EXHAUSTED":
                    time.sleep(0.01)  # refused at once: a real client backs off

    memory = [_rss_mb(server.proc.pid)]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        memory.append(_rss_mb(server.proc.pid))
    server.stop()
    ordered = sorted(latencies)
    answered = outcomes.get("OK", 0)
    return {
        "load_seconds": seconds,
        "load_clients": clients,
        "load_concurrency_limit": limit,
        "load_calls": sum(outcomes.values()),
        "load_outcomes": outcomes,
        "load_hung": outcomes.get("DEADLINE_EXCEEDED", 0),
        "load_other_errors": sum(v for k, v in outcomes.items() if k not in REFUSED_OR_OK),
        "load_p50_ms": 1000 * statistics.median(ordered) if ordered else None,
        "load_p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))] if ordered else None,
        "load_samples_per_s": answered * samples / seconds,
        "load_rss_mb_start": memory[0],
        "load_rss_mb_max": max(memory),
        "load_rss_mb_end": memory[-1],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=15.0)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--load-clients", type=int, default=8)
    parser.add_argument(
        "--weight-transport",
        default="auto",
        choices=["auto", "grpc", "shm", "collective"],
        help="how the trainers push weights (issue 25)",
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory(prefix="rpp-faults-") as tmp:
        result = schedule(Path(tmp), args.iterations, args.budget_s, args.weight_transport)
    result["weight_transport"] = args.weight_transport
    result.pop("outputs")
    result.pop("addresses")
    for segment in result["segments"]:
        print(
            f"segment: exit {segment['exit']}, iterations {segment['steps'][:1]}..."
            f"{segment['steps'][-1:]}, resumable at {segment['checkpoint_iteration']}",
            flush=True,
        )
    if args.load_seconds > 0:
        result.update(load_test(args.load_seconds, args.load_clients))
    result.pop("segments")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
