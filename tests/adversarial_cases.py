"""Inputs that once stalled or broke the servers, and a health probe to watch a server with.

Shared by tests/test_adversarial.py (each case against a real server on loopback) and
benchmarks/adversarial_inputs.py (the same cases, measured). Each case is what a misbehaving
policy or client really sends: a policy in RL training emits long runs of spaces and thousands of
open braces, and clients send ids of any length.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rpp_lightning.proto import generation_pb2 as gen_pb
from rpp_lightning.proto import reward_pb2

FREEZE_RESPONSE = "The answer is a" + " " * 40000 + "b"
"""The answer-matching regex was quadratic in this run of spaces (the server froze ~10 s)."""
OPEN_BRACES_RESPONSE = "\\boxed{" * 8000
"""The brace scan was quadratic in unclosed \\boxed{ (7 s of CPU after the caller left)."""
LONG_ID = "d" * 100_000
MAX_MESSAGE_BYTES = 1000
"""What a status message may take (rpp_lightning.rpc.serving.MAX_STATUS_MESSAGE_BYTES)."""


def score_request(*samples: tuple[str, str, str], metadata=None) -> reward_pb2.ScoreRequest:
    """A ScoreRequest of (id, response, reference) triples."""
    return reward_pb2.ScoreRequest(
        samples=[
            reward_pb2.Sample(id=i, prompt="p", response=r, reference=ref, metadata=metadata or {})
            for i, r, ref in samples
        ]
    )


def math_cases() -> dict[str, reward_pb2.ScoreRequest]:
    """Score requests a math server must answer quickly and cleanly, by name."""
    return {
        "freeze_spaces": score_request(("freeze", FREEZE_RESPONSE, "1")),
        "open_braces": score_request(("braces", OPEN_BRACES_RESPONSE, "1")),
        "long_duplicate_ids": score_request((LONG_ID, "\\boxed{1}", "1"), (LONG_ID, "2", "2")),
        "id_over_limit": score_request(("i" * 1_000_001, "\\boxed{1}", "1")),
        "metadata_key_over_limit": score_request(
            ("k", "\\boxed{1}", "1"), metadata={"m" * 1_000_001: "v"}
        ),
    }


def generation_cases(vocab_size: int) -> dict[str, gen_pb.GenerateRequest]:
    """Generate requests a generation server must refuse cleanly, by name."""
    sampling = gen_pb.SamplingParams(n=1, max_new_tokens=4)
    return {
        "stop_ids_outside_vocab": gen_pb.GenerateRequest(
            prompts=[gen_pb.Prompt(id="p", token_ids=[1])],
            sampling=gen_pb.SamplingParams(
                n=1, max_new_tokens=4, stop_token_ids=list(range(vocab_size, vocab_size + 3000))
            ),
        ),
        "empty_prompt_long_id": gen_pb.GenerateRequest(
            prompts=[gen_pb.Prompt(id="e" * 100_000, token_ids=[])], sampling=sampling
        ),
    }


def unknown_tensor_stream(version: int = 1) -> list[gen_pb.UpdateWeightsRequest]:
    """An UpdateWeights stream naming a tensor of 1 MB of name."""
    chunk = gen_pb.TensorChunk(
        name="t" * 1_000_000, dtype=gen_pb.TENSOR_DTYPE_FLOAT32, shape=[1], data=b"\0" * 4
    )
    return [
        gen_pb.UpdateWeightsRequest(header=gen_pb.WeightsHeader(target_version=version)),
        gen_pb.UpdateWeightsRequest(chunks=gen_pb.TensorChunks(chunks=[chunk])),
        gen_pb.UpdateWeightsRequest(commit=gen_pb.WeightsCommit(num_tensors=1, num_bytes=4)),
    ]


def bad_directories(root: str) -> dict[str, str]:
    """safetensors_dir values under `root` that cannot be resolved (a symlink loop is made)."""
    import os

    loop = os.path.join(root, "loop")
    if not os.path.islink(loop):
        os.symlink(loop, loop)  # a link to itself: resolving it loops
    return {
        "nul_byte": os.path.join(root, "a\0b"),
        "long_name": os.path.join(root, "n" * 300),
        "long_path": os.path.join(root, *(["p" * 100] * 50)),
        "symlink_loop": os.path.join(loop, "x"),
    }


@dataclass
class HealthProbe:
    """Checks grpc.health.v1 every `interval_s` on its own channel while in the `with` block.

    `worst_s` is the slowest answer (a check that got none counts its whole wait), `statuses` the
    serving statuses seen, `failures` the checks that raised."""

    address: str
    interval_s: float = 0.02
    timeout_s: float = 30.0
    latencies: list[float] = field(default_factory=list)
    statuses: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    @property
    def worst_s(self) -> float:
        return max(self.latencies, default=0.0)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
                    self.statuses.add(
                        health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    )
                except grpc.RpcError as exc:
                    self.failures.append(exc.code().name)
                self.latencies.append(time.perf_counter() - start)
                self._stop.wait(self.interval_s)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
