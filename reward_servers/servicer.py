"""RewardServicer: the one rpp.v1.RewardService implementation every verifier runs behind.

It owns everything that is the same for all scorers: request validation (naming the offending
sample ids), passing the client's remaining deadline down, refusing non-finite rewards, and a log
line per batch. The verifier only scores. `score_request` is plain Python (proto in, proto out),
so its logic is testable without a server; `Score` and `GetInfo` are the thin gRPC methods.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import grpc

from reward_servers.base import SampleInput, Verifier, serving_call
from rpp_lightning.proto import REWARD_SERVICE, reward_pb2, reward_pb2_grpc
from rpp_lightning.rpc.serving import ServiceSpec, StatusError, invalid_argument, quote

log = logging.getLogger("rpp.reward")

_NO_DEADLINE_S = 10**7
_MAX_IDS_IN_MESSAGE = 5  # error messages name this many ids, then "... and N more"


@dataclass
class RequestLimits:
    """What one Score request may contain; beyond it the request is INVALID_ARGUMENT."""

    max_samples: int = 4096
    """Most samples per request (reported by GetInfo as max_samples_per_request)."""
    max_chars: int = 1_000_000
    """Longest string of a sample (id, prompt, response, reference, metadata key or value), in
    characters."""


def _name_ids(ids: list[str]) -> str:
    # Ids are the client's strings: each is quoted short, so the message stays small.
    shown = ", ".join(quote(i) for i in ids[:_MAX_IDS_IN_MESSAGE])
    more = len(ids) - _MAX_IDS_IN_MESSAGE
    return shown + (f" ... and {more} more" if more > 0 else "")


def _sample_label(index: int, sample: reward_pb2.Sample) -> str:
    # An empty id is legal on the wire; the index still tells the caller which sample it was.
    return sample.id if sample.id else f"#{index}"


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Serves any `Verifier` as rpp.v1.RewardService."""

    def __init__(self, verifier: Verifier, limits: RequestLimits | None = None) -> None:
        self.verifier = verifier
        self.limits = limits or RequestLimits()

    def spec(self) -> ServiceSpec:
        """How `GrpcServer` registers this servicer."""
        return ServiceSpec(
            self, reward_pb2_grpc.add_RewardServiceServicer_to_server, REWARD_SERVICE
        )

    def validate(self, request: reward_pb2.ScoreRequest) -> list[SampleInput]:
        """Decode the request, or raise INVALID_ARGUMENT listing every problem with sample ids."""
        samples = request.samples
        if not samples:
            raise invalid_argument("ScoreRequest.samples is empty: send at least one sample")
        if len(samples) > self.limits.max_samples:
            raise invalid_argument(
                f"{len(samples)} samples in one request; this server accepts at most "
                f"{self.limits.max_samples} (split the batch)"
            )
        empty_response, missing_reference, too_long, seen, duplicates = [], [], [], set(), []
        for index, sample in enumerate(samples):
            label = _sample_label(index, sample)
            if not sample.response:
                empty_response.append(label)
            if self.verifier.requires_reference and not sample.reference:
                missing_reference.append(label)
            strings = [sample.id, sample.prompt, sample.response, sample.reference]
            strings += [text for item in sample.metadata.items() for text in item]
            if max(len(s) for s in strings) > self.limits.max_chars:
                too_long.append(label)
            if sample.id in seen:
                duplicates.append(label)
            seen.add(sample.id)
        problems = []
        if empty_response:
            problems.append(f"empty response in samples {_name_ids(empty_response)}")
        if missing_reference:
            problems.append(
                f"{self.verifier.name} requires a reference; missing in samples "
                f"{_name_ids(missing_reference)}"
            )
        if too_long:
            problems.append(
                f"strings longer than {self.limits.max_chars} characters in samples "
                f"{_name_ids(too_long)}"
            )
        if duplicates:
            problems.append(f"duplicate sample ids {_name_ids(duplicates)}")
        if problems:
            raise invalid_argument("; ".join(problems))
        return [
            SampleInput(s.id, s.prompt, s.response, s.reference, dict(s.metadata)) for s in samples
        ]

    def score_request(
        self, request: reward_pb2.ScoreRequest, deadline_s: float | None = None
    ) -> reward_pb2.ScoreResponse:
        """Validate, score with the verifier, check the rewards; proto in, proto out."""
        start = time.perf_counter()
        samples = self.validate(request)
        results = self.verifier.score(samples, deadline_s)
        if len(results) != len(samples):
            raise StatusError(
                grpc.StatusCode.INTERNAL,
                f"{self.verifier.name} returned {len(results)} scores for {len(samples)} samples",
            )
        if deadline_s is not None and time.perf_counter() - start > deadline_s:
            raise StatusError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"scoring {len(samples)} samples took longer than the {deadline_s:.2f}s deadline",
            )
        # A NaN reward silently poisons a policy update; fail loudly with the ids instead.
        bad = [
            s.id or f"#{i}"
            for i, (s, r) in enumerate(zip(samples, results, strict=True))
            if not math.isfinite(r.reward)
        ]
        if bad:
            raise StatusError(
                grpc.StatusCode.INTERNAL,
                f"{self.verifier.name} produced non-finite rewards for samples {_name_ids(bad)}",
            )
        response = reward_pb2.ScoreResponse(
            scores=[
                reward_pb2.Score(id=s.id, reward=r.reward, info=r.info)
                for s, r in zip(samples, results, strict=True)
            ]
        )
        ms = (time.perf_counter() - start) * 1000
        mean = sum(r.reward for r in results) / len(results)
        log.info(
            "scored samples=%d latency_ms=%.1f samples_per_s=%.1f mean_reward=%.4f",
            len(samples),
            ms,
            len(samples) / max(ms / 1000, 1e-9),
            mean,
        )
        return response

    def Score(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext):
        """rpp.v1.RewardService/Score: the remaining client deadline goes to the verifier."""
        remaining = context.time_remaining()
        # gRPC reports "no deadline" as a huge number of seconds, which overflows timers below.
        if remaining is not None and remaining > _NO_DEADLINE_S:
            remaining = None
        # Runs when the call ends for any reason: a client that cancels or dies, or whose
        # deadline passes, sets it while the verifier still works (see base.client_gone).
        gone = threading.Event()
        if not context.add_callback(gone.set):
            gone.set()  # it has already ended
        with serving_call(gone):
            return self.score_request(request, remaining)

    def GetInfo(self, request: reward_pb2.GetInfoRequest, context: grpc.ServicerContext):
        """rpp.v1.RewardService/GetInfo: from the verifier's class attributes and the limits."""
        return self.info()

    def info(self) -> reward_pb2.RewardServerInfo:
        """What GetInfo returns."""
        v = self.verifier
        return reward_pb2.RewardServerInfo(
            name=v.name,
            kind=v.kind,
            version=v.version,
            requires_reference=v.requires_reference,
            max_samples_per_request=self.limits.max_samples,
        )
