"""Calls to a replicated service that outlive faults: deadlines, a retry budget, lost replicas.

Every remote call the trainer makes (generate, push weights, score) goes through a ReplicaSet:
one channel per replica, so the client knows which replica answered or failed. A failed attempt
(the replica is gone, hung past its deadline, or shedding load) moves the call to the next replica
in service; when none is left, the call waits with exponential backoff and full jitter and tries
them all again, until the retry budget is spent. Then it raises ServerUnavailableError, naming
every address and the last status, and the trainer checkpoints and exits (module.py).

Why a retry never scores or trains on a sample twice: a call's answer is used once, by the one
caller waiting for it; an attempt that failed returned nothing. Scoring is a pure function of its
request and generation of (prompts, seed, weights version), so a re-sent call gets the same answer
it would have got the first time. Imports grpc and the standard library only.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from rpp_lightning.rpc.channels import ChannelConfig, open_channel

log = logging.getLogger("rpp.replicas")
T = TypeVar("T")

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # gone, restarting, draining, unreachable
        grpc.StatusCode.DEADLINE_EXCEEDED,  # hung, or too slow for the per-call deadline
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # at its concurrency limit: shedding load
    }
)


@dataclass
class FailurePolicy:
    """How long the trainer waits for servers that fail, before it checkpoints and exits.

    Each attempt of a call has the source's own `timeout_s` as its deadline.
    """

    retry_budget_s: float = 300.0
    """Longest time one call keeps retrying (over every replica) before the run stops."""
    initial_backoff_s: float = 0.5
    """Wait before the first retry once every replica failed; doubles each round."""
    max_backoff_s: float = 15.0
    """Cap of the wait between rounds (each wait is drawn uniformly below it: full jitter)."""
    revive_after_s: float = 30.0
    """A lost replica is skipped while others serve, and tried again after this long."""

    def validate(self) -> None:
        problems = []
        if self.retry_budget_s < 0:
            problems.append(f"retry_budget_s must be >= 0, got {self.retry_budget_s}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            problems.append(
                f"need 0 < initial_backoff_s ({self.initial_backoff_s}) <= max_backoff_s "
                f"({self.max_backoff_s})"
            )
        if self.revive_after_s <= 0:
            problems.append(f"revive_after_s must be > 0, got {self.revive_after_s}")
        if problems:
            raise ValueError("failure_policy: " + "; ".join(problems))

    def backoff_s(self, round_: int) -> float:
        """Wait before retry round `round_` (0-based): uniform in [0, min(max, initial·2^k)]."""
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * 2**round_))


_OPEN: weakref.WeakSet[ReplicaSet] = weakref.WeakSet()
INTERRUPTED = threading.Event()
"""Set by `rpp-train`'s SIGINT handler: a Ctrl-C that lands inside a gRPC call must stop the
run, not turn into a failed attempt that is retried."""


def _close_all() -> None:
    for replicas in list(_OPEN):
        replicas.close()


# At interpreter exit Python joins worker threads (a scoring call in flight) before it runs
# atexit hooks; a call retrying against stopped servers would hold the exit for its whole
# budget. threading's own exit hooks run first, the newest first: close every set there.
getattr(threading, "_register_atexit", lambda _: None)(_close_all)


def describe(exc: BaseException) -> str:
    """One line for an error: the gRPC status and details, or the exception."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class ServerUnavailableError(RuntimeError):
    """No replica of a service answered within the retry budget."""


@dataclass
class _Replica:
    address: str
    channel: grpc.Channel
    stub: Any
    lost_at: float | None = None  # monotonic time it was marked lost; None = in service
    lost_reason: str = ""


class ReplicaSet:
    """Stubs of every replica of one service, and `call`, which survives their faults."""

    def __init__(
        self,
        name: str,
        config: ChannelConfig,
        stub_class: Callable[[grpc.Channel], Any],
        service_name: str,
        policy: FailurePolicy | None = None,
    ) -> None:
        if not config.addresses:
            raise ValueError(f"{name} has no addresses")
        self.name, self.config = name, config
        self.policy = policy or FailurePolicy()
        self.metadata = config.metadata()
        self._lock = threading.Lock()
        self._closed = threading.Event()  # set by close(): calls stop retrying at once
        self.replicas: list[_Replica] = []
        for address in config.addresses:
            single = dataclasses.replace(config, addresses=[address])
            channel = open_channel(single, [service_name])
            self.replicas.append(_Replica(address, channel, stub_class(channel)))
        _OPEN.add(self)

    def __len__(self) -> int:
        return len(self.replicas)

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def in_service(self, index: int) -> bool:
        replica = self.replicas[index]
        if replica.lost_at is None:
            return True
        return time.monotonic() - replica.lost_at >= self.policy.revive_after_s

    def mark_lost(self, index: int, reason: str) -> None:
        """Take a replica out of service (its calls go to the others) and say so once."""
        replica = self.replicas[index]
        with self._lock:
            first = replica.lost_at is None
            replica.lost_at, replica.lost_reason = time.monotonic(), reason
        if first:
            others = len(self.replicas) - 1
            log.warning(
                "%s: replica %s lost (%s); %s",
                self.name,
                replica.address,
                reason,
                f"its calls go to the {others} other(s)" if others else "waiting for it",
            )

    def mark_serving(self, index: int) -> None:
        replica = self.replicas[index]
        with self._lock:
            was_lost, replica.lost_at = replica.lost_at is not None, None
        if was_lost:
            log.warning("%s: replica %s serves again", self.name, replica.address)

    def call(
        self,
        fn: Callable[[Any, float], T],
        first: int = 0,
        replicas: Sequence[int] | None = None,
        refuse: Callable[[grpc.RpcError], str | None] | None = None,
    ) -> T:
        """`fn(stub, timeout_s)` on replica `first` (or the next in service), surviving faults.

        `replicas` limits the call to those indexes (a weight push goes to one replica).
        `refuse(exc)` may name a non-retryable error that still means "this replica cannot
        serve the call" (a stale weights version): the replica is marked lost and the call moves
        on; when a round over the replicas ends with none serving and one refusing, that error
        is raised at once (waiting would not help: the caller must act, e.g. push weights).
        """
        candidates = list(replicas) if replicas is not None else list(range(len(self.replicas)))
        start, round_, last = time.monotonic(), 0, "no attempt"
        refused: set[int] = set()
        refusal: grpc.RpcError | None = None
        while True:
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt
            if self._closed.is_set():
                raise ServerUnavailableError(f"{self.name}: the client was closed ({last})")
            order = candidates[first % len(candidates) :] + candidates[: first % len(candidates)]
            usable = [i for i in order if i not in refused and self.in_service(i)]
            if not usable:  # every replica lost: try them all after the backoff
                usable = [i for i in order if i not in refused]
            for index in usable:
                replica = self.replicas[index]
                try:
                    result = fn(replica.stub, self.config.timeout_s)
                except grpc.RpcError as exc:
                    if INTERRUPTED.is_set():
                        raise KeyboardInterrupt from exc
                    reason = refuse(exc) if refuse is not None else None
                    if reason is not None:
                        refused.add(index)
                        refusal = exc
                    elif exc.code() in RETRYABLE:
                        reason = describe(exc)
                    else:
                        raise
                    last = f"{replica.address}: {reason}"
                    self.mark_lost(index, reason)
                    continue
                self.mark_serving(index)
                return result
            if refusal is not None:  # none served; one that answered cannot: the caller's turn
                raise refusal
            elapsed = time.monotonic() - start
            wait = self.policy.backoff_s(round_)
            if elapsed + wait > self.policy.retry_budget_s:
                raise ServerUnavailableError(
                    f"{self.name}: no replica of {', '.join(self.addresses)} answered within "
                    f"the retry budget ({self.policy.retry_budget_s:g} s); last: {last}"
                )
            self._closed.wait(wait)  # a close() (the run is stopping) ends the wait at once
            round_ += 1

    def close(self) -> None:
        """Close every channel; calls in flight end, and none retries any more."""
        self._closed.set()
        for replica in self.replicas:
            replica.channel.close()
