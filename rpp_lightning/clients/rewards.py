"""The trainer's side of the reward contract: route samples to reward sources, combine by weight.

Each source is a reward server or several replicas of one (`replicas.ReplicaSet`: a batch's
chunks are spread over them, and a lost replica's chunks go to the others). A sample goes to
every source whose route matches its dataset row; its reward is the weighted sum over those
sources, and each source's reward is kept for logging. An answer that does not fit the request
(other sample ids, a missing or non-finite score) is refused whole: nothing is trained on it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from rpp_lightning.config import RewardSource
from rpp_lightning.proto import REWARD_SERVICE, reward_pb2, reward_pb2_grpc
from rpp_lightning.rpc.channels import start_calls
from rpp_lightning.rpc.failures import FailurePolicy, ServerUnavailableError, describe
from rpp_lightning.rpc.replicas import ReplicaSet
from rpp_lightning.rpc.serving import server_seconds

_CHUNK = 128  # samples per Score call: chunks run in parallel across replicas


@dataclass
class RewardQuery:
    """One (prompt, response) to score, with its dataset row's reference and extra columns."""

    prompt: str
    response: str
    reference: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class RewardBatch:
    """Scores of a batch: the combined reward and each source's part."""

    total: list[float]
    """Weighted sum over the sources each sample was routed to."""
    per_source: dict[str, list[float | None]]
    """Each source's raw reward (None where the sample was not routed to it)."""
    correct: list[bool | None]
    """Verifier verdicts (info["correct"]) where a source gave one."""
    infos: list[dict[str, str]]
    """Merged `info` maps, keys prefixed with the source name."""


class RewardError(RuntimeError):
    """A reward source failed; the message names the source and the gRPC status."""


class RewardClient:
    """Scores samples on every configured reward source."""

    def __init__(
        self, sources: Sequence[RewardSource], policy: FailurePolicy | None = None
    ) -> None:
        if not sources:
            raise ValueError("at least one reward source is required")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"reward source names must be unique, got {names}")
        for source in sources:
            if not source.addresses:
                raise ValueError(f"reward source {source.name!r} has no addresses")
        self.sources = list(sources)
        self._replicas = [
            ReplicaSet(
                f"reward source {s.name!r}",
                s,
                reward_pb2_grpc.RewardServiceStub,
                REWARD_SERVICE,
                policy,
            )
            for s in self.sources
        ]
        self._chunks_sent = 0  # spreads chunks over replicas from call to call
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="reward")
        self.last_server_s = 0.0
        """Server-side seconds of the last `score` (its slowest parallel call)."""

    def info(self) -> list[reward_pb2.RewardServerInfo]:
        """GetInfo of each source (from one of its replicas)."""
        return [
            replicas.call(
                lambda stub, timeout, r=replicas: stub.GetInfo(
                    reward_pb2.GetInfoRequest(), timeout=timeout, metadata=r.metadata
                )
            )
            for replicas in self._replicas
        ]

    def _score_chunk(self, index: int, queries: Sequence[RewardQuery], rows: list[int], first):
        source, replicas = self.sources[index], self._replicas[index]
        request = reward_pb2.ScoreRequest(
            samples=[
                reward_pb2.Sample(
                    id=str(row),
                    prompt=queries[row].prompt,
                    response=queries[row].response,
                    reference=queries[row].reference,
                    metadata=queries[row].metadata,
                )
                for row in rows
            ]
        )
        try:
            reply, call = replicas.call(
                lambda stub, timeout: stub.Score.with_call(
                    request, timeout=timeout, metadata=replicas.metadata
                ),
                first=first,
            )
        except ServerUnavailableError as exc:
            raise RewardError(str(exc)) from exc
        except grpc.RpcError as exc:  # refused (bad request, auth...): retrying cannot help
            raise RewardError(
                f"reward source {source.name!r} ({', '.join(source.addresses)}) failed: "
                f"{describe(exc)}"
            ) from exc
        ids = [s.id for s in reply.scores]
        if ids != [str(r) for r in rows]:
            raise RewardError(
                f"reward source {source.name!r} answered {len(ids)} scores for sample ids "
                f"{_preview(ids)}, asked for {len(rows)} with ids {_preview(rows)}; "
                "nothing of this answer is used"
            )
        for score in reply.scores:
            if not math.isfinite(score.reward):
                raise RewardError(
                    f"reward source {source.name!r} sent a non-finite reward ({score.reward}) "
                    f"for sample {score.id}; nothing of this answer is used"
                )
        return rows, reply.scores, server_seconds(call)

    def score(self, queries: Sequence[RewardQuery]) -> RewardBatch:
        """Score every query on its sources (in parallel); raise RewardError on any failure."""
        n = len(queries)
        per_source: dict[str, list[float | None]] = {s.name: [None] * n for s in self.sources}
        correct: list[bool | None] = [None] * n
        infos: list[dict[str, str]] = [{} for _ in range(n)]
        routed_anywhere = [False] * n
        sources, thunks = [], []
        for index, source in enumerate(self.sources):
            rows = routed(source, [q.metadata for q in queries])
            for row in rows:
                routed_anywhere[row] = True
            for start in range(0, len(rows), _CHUNK):
                chunk = rows[start : start + _CHUNK]
                sources.append(source)
                self._chunks_sent += 1  # chunk k starts at replica k: spread over replicas
                thunks.append(
                    functools.partial(self._score_chunk, index, queries, chunk, self._chunks_sent)
                )
        missing = [i for i, routed in enumerate(routed_anywhere) if not routed]
        if missing:
            raise ValueError(
                f"{len(missing)} samples match no reward source (first: row {missing[0]}, "
                f"metadata {queries[missing[0]].metadata}); check route_column/route_values"
            )
        self.last_server_s = 0.0
        for source, future in zip(sources, start_calls(self._pool, thunks), strict=True):
            rows, scores, server_s = future.result()
            # calls run in parallel: the slowest one's server time bounds the phase
            self.last_server_s = max(self.last_server_s, server_s)
            for row, score in zip(rows, scores, strict=True):
                per_source[source.name][row] = score.reward
                for key, value in score.info.items():
                    infos[row][f"{source.name}.{key}"] = value
                if "correct" in score.info:
                    correct[row] = score.info["correct"].lower() == "true"
        total = [
            sum(
                s.weight * per_source[s.name][row]
                for s in self.sources
                if per_source[s.name][row] is not None
            )
            for row in range(n)
        ]
        return RewardBatch(total=total, per_source=per_source, correct=correct, infos=infos)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for replicas in self._replicas:
            replicas.close()


def routed(source: RewardSource, metadata: Sequence[dict[str, str]]) -> list[int]:
    """Indexes of the samples (by their dataset row's extra columns) that go to `source`."""
    if source.route_column is None:
        return list(range(len(metadata)))
    wanted = set(source.route_values)
    return [i for i, row in enumerate(metadata) if row.get(source.route_column) in wanted]


def check_routes(sources: Sequence[RewardSource], rows: Sequence, where: str) -> None:
    """Refuse dataset rows (PromptRow) that no reward source's route takes, naming the first."""
    metadata = [row.metadata for row in rows]
    taken = set()
    for source in sources:
        taken.update(routed(source, metadata))
    missing = [i for i in range(len(rows)) if i not in taken]
    if missing:
        routes = {s.name: (s.route_column, s.route_values) for s in sources}
        raise ValueError(
            f"{where}: {len(missing)} rows match no reward source (first: row {missing[0]}, "
            f"columns {rows[missing[0]].metadata}); routes (column, values): {routes}"
        )


def _preview(ids: Sequence, limit: int = 4) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"
