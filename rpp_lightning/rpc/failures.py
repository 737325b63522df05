"""What counts as a failed attempt, how long the trainer waits for failing servers, and how a
failure is named in one line. Imports grpc and the standard library only."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

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


def describe(exc: BaseException) -> str:
    """One line for an error: the gRPC status and details, or the exception."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class ServerUnavailableError(RuntimeError):
    """No replica of a service answered within the retry budget."""
