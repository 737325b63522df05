"""User verifiers and small helpers for the reward-server tests. Verifiers load like a user's:

    rpp-reward-server --verifier reward_test_verifiers:SleepyLength --verifier-args sleep_s=2

(the tests put tests/ on PYTHONPATH). They stand in for slow or user-defined scorers so the
runner's deadline, concurrency and drain behaviour can be tested with a known duration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from reward_servers.base import SampleInput, ScoreResult, Verifier, client_gone
from reward_servers.servicer import RequestLimits, RewardServicer
from rpp_lightning.proto import reward_pb2, reward_pb2_grpc
from rpp_lightning.rpc.server_config import ServerConfig
from rpp_lightning.rpc.serving import GrpcServer, StatusError


class SleepyLength(Verifier):
    """Reward = len(response) * scale, after sleeping `sleep_s` (a slow scorer of known speed)."""

    name = "sleepy-length"
    kind = "test"
    version = "1"

    def __init__(self, sleep_s: float = 0.0, scale: float = 1.0) -> None:
        self.sleep_s = float(sleep_s)
        self.scale = float(scale)

    def score(self, samples: list[SampleInput], deadline_s: float | None) -> list[ScoreResult]:
        time.sleep(self.sleep_s)
        return [
            ScoreResult(len(s.response) * self.scale, {"slept_s": str(self.sleep_s)})
            for s in samples
        ]


class WaitsForClient(Verifier):
    """Never answers by itself: waits for `client_gone()` and records after how long it was set."""

    name = "waits-for-client"
    kind = "test"

    def __init__(self) -> None:
        self.gone_after_s: list[float] = []

    def score(self, samples: list[SampleInput], deadline_s: float | None) -> list[ScoreResult]:
        start = time.monotonic()
        if not client_gone().wait(30):
            raise StatusError(grpc.StatusCode.INTERNAL, "the client never went away")
        self.gone_after_s.append(time.monotonic() - start)
        raise StatusError(grpc.StatusCode.CANCELLED, "the client went away")


class ExactMatch(Verifier):
    """1.0 when the stripped response equals the reference (needs a reference)."""

    name = "exact-match"
    kind = "verifier"
    version = "1"
    requires_reference = True

    def score(self, samples: list[SampleInput], deadline_s: float | None) -> list[ScoreResult]:
        return [ScoreResult(float(s.response.strip() == s.reference.strip())) for s in samples]


class NotAVerifier:
    """A class that does not subclass Verifier: the CLI must refuse it."""


@contextmanager
def serving(
    verifier: Verifier, config: ServerConfig | None = None, limits: RequestLimits | None = None
) -> Iterator[GrpcServer]:
    """An in-process GrpcServer hosting `verifier` on a free loopback port; stopped on exit."""
    server = GrpcServer(config or ServerConfig(port=0), [RewardServicer(verifier, limits).spec()])
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)
        verifier.close()


def reward_stub(channel: grpc.Channel) -> reward_pb2_grpc.RewardServiceStub:
    return reward_pb2_grpc.RewardServiceStub(channel)


def request(*samples: tuple[str, str, str]) -> reward_pb2.ScoreRequest:
    """A ScoreRequest from (id, response, reference) triples."""
    return reward_pb2.ScoreRequest(
        samples=[
            reward_pb2.Sample(id=i, prompt="p", response=r, reference=ref) for i, r, ref in samples
        ]
    )


def pool_task(task: str) -> str:
    """A WorkerPool task with known behaviour: "sleep:S", "exit" (the process dies), "raise"."""
    import os

    if task.startswith("sleep:"):
        time.sleep(float(task.split(":")[1]))
    elif task == "exit":
        os._exit(3)
    elif task == "raise":
        raise ValueError("asked to raise")
    return task.upper()
