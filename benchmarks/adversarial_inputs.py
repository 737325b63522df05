"""Adversarial input against real server processes: statuses, health latency, memory.

    python benchmarks/adversarial_inputs.py                  # each case 3 times
    python benchmarks/adversarial_inputs.py --repeat 10

A math server (`workers=2 timeout_s=5 --max-message-mb 16`) and a CPU generation server on a
tiny model (`--weights-root`) are started as processes on loopback ports, as a user starts
them. Every case of tests/adversarial_cases.py is sent to them (the response that froze the
math server, unclosed braces, huge ids, out-of-vocabulary stop ids, unresolvable weight paths,
a 1 MB tensor name), plus a caller that leaves a 4096 x 117-token request after 3 s, while a
health probe checks each server every 20 ms. Printed: the statuses, the slowest health answer,
the largest status message, how long the next caller waited after one left, and each server's
memory (with its worker processes) before and after. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the cases live beside the tests that check them

import grpc  # noqa: E402
from adversarial_cases import (  # noqa: E402
    HealthProbe,
    bad_directories,
    generation_cases,
    math_cases,
    unknown_tensor_stream,
)
from fault_survival import _rss_mb, _server  # noqa: E402


def _outcome(call) -> tuple[str, int]:
    try:
        call()
        return "OK", 0
    except grpc.RpcError as exc:
        return exc.code().name, len((exc.details() or "").encode())


def _decode_step_s(stub, prompt) -> float:
    """Seconds of one decode step of a 64-row batch (the server's sub-batch), from the time of
    21 steps less that of 1 (the prompt's forward and the call's own cost cancel out)."""
    from rpp_lightning.proto import generation_pb2 as pb

    def timed(tokens: int) -> tuple[float, int]:
        # min_new_tokens does not exist: a high temperature keeps rows from stopping early
        sampling = pb.SamplingParams(n=64, max_new_tokens=tokens, temperature=1.0, seed=3)
        request = pb.GenerateRequest(prompts=prompt, sampling=sampling)
        start = time.monotonic()
        reply = stub.Generate(request, timeout=120)
        lengths = [len(c.token_ids) for c in reply.results[0].completions]
        return time.monotonic() - start, max(lengths)

    one, _ = timed(1)
    many, steps = timed(21)
    return max(many - one, 1e-6) / max(steps - 1, 1)


def run(repeat: int, work: Path) -> dict:
    from rpp_lightning.proto import generation_pb2 as pb
    from rpp_lightning.proto import generation_pb2_grpc, reward_pb2_grpc
    from rpp_lightning.tiny import save_tiny_causal_lm
    from rpp_lightning.weight_transport.wire import directory_update_requests

    model = save_tiny_causal_lm(work / "model")
    root = work / "weights-root"
    root.mkdir()
    math_argv = ["reward_servers.cli", "math", "--port", "0", "--max-message-mb", "16"]
    math = _server([*math_argv, "--verifier-args", "workers=2", "timeout_s=5"], "math", True)
    gen_argv = ["rpp_lightning.generation.cli", "--model", str(model), "--port", "0"]
    generation = _server([*gen_argv, "--weights-root", str(root)], "generation", True)
    statuses: Counter[str] = Counter()
    largest_message = 0
    worst_health: dict[str, float] = {}
    rss = {"math_before": _rss_mb(math.proc.pid), "generation_before": _rss_mb(generation.proc.pid)}
    try:
        with grpc.insecure_channel(math.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            for name, case in math_cases().items():
                with HealthProbe(math.address) as probe:
                    for _ in range(repeat):
                        status, size = _outcome(lambda c=case: stub.Score(c, timeout=60))
                        statuses[f"math/{name}/{status}"] += 1
                        largest_message = max(largest_message, size)
                worst_health[f"math/{name}"] = probe.worst_s
                print(f"math {name}: health worst {1000 * probe.worst_s:.1f} ms", flush=True)
        with grpc.insecure_channel(generation.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            vocab = stub.GetInfo(pb.GenerationInfoRequest(), timeout=10).vocab_size
            cases = {name: (stub.Generate, case) for name, case in generation_cases(vocab).items()}
            cases["unknown_tensor_name"] = (stub.UpdateWeights, unknown_tensor_stream())
            for name, path in bad_directories(str(root)).items():
                cases[f"dir_{name}"] = (stub.UpdateWeights, directory_update_requests(path, 1))
            with HealthProbe(generation.address) as probe:
                for name, (method, case) in cases.items():
                    for _ in range(repeat):
                        arg = iter(case) if isinstance(case, list) else case
                        status, size = _outcome(lambda m=method, a=arg: m(a, timeout=60))
                        statuses[f"generation/{name}/{status}"] += 1
                        largest_message = max(largest_message, size)
            worst_health["generation/refusals"] = probe.worst_s
            # A caller that leaves: the next one waits for one decode step, not the whole call.
            prompt = [pb.Prompt(id="p", token_ids=[1, 5, 6])]
            huge = pb.GenerateRequest(
                prompts=prompt,
                sampling=pb.SamplingParams(n=4096, max_new_tokens=117, temperature=1.0, seed=1),
            )
            small = pb.GenerateRequest(
                prompts=prompt, sampling=pb.SamplingParams(n=1, max_new_tokens=1, seed=2)
            )
            stub.Generate(small, timeout=60)  # warm-up, then the same call alone, for scale
            start = time.monotonic()
            stub.Generate(small, timeout=60)
            small_alone_s = time.monotonic() - start
            step_s = _decode_step_s(stub, prompt)
            with HealthProbe(generation.address) as probe:
                status, _ = _outcome(lambda: stub.Generate(huge, timeout=3))
                statuses[f"generation/caller_leaves/{status}"] += 1
                left = time.monotonic()
                stub.Generate(small, timeout=60)
                next_caller_wait_s = time.monotonic() - left
            worst_health["generation/caller_leaves"] = probe.worst_s
        time.sleep(1.0)  # let a killed worker's replacement settle before measuring memory
        rss["math_after"] = _rss_mb(math.proc.pid)
        rss["generation_after"] = _rss_mb(generation.proc.pid)
    finally:
        math.stop()
        generation.stop()
    bad = sum(n for key, n in statuses.items() if key.endswith(("/INTERNAL", "/UNKNOWN")))
    return {
        "calls": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "internal_or_unknown": bad,
        "largest_message_bytes": largest_message,
        "health_worst_ms": {k: round(1000 * v, 1) for k, v in worst_health.items()},
        "health_worst_ms_max": round(1000 * max(worst_health.values()), 1),
        "next_caller_wait_after_one_left_s": round(next_caller_wait_s, 3),
        "next_caller_alone_s": round(small_alone_s, 3),
        "decode_step_64_rows_s": round(step_s, 4),
        "next_caller_wait_in_decode_steps": round(next_caller_wait_s / step_s, 1),
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="times each case is sent")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rpp-adversarial-") as tmp:
        result = run(args.repeat, Path(tmp))
    for key, count in result["statuses"].items():
        print(f"{key}: {count}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
