"""The one interface every reward scorer implements: a batch of samples in, rewards out.

A user verifier is a subclass of `Verifier` in any importable module, served with

    rpp-reward-server --verifier my_pkg.my_module:MyVerifier --verifier-args threshold=0.5

The servicer (`reward_servers/servicer.py`) validates requests before `score` sees them, so a
verifier can assume: at least one sample, every `response` non-empty, every `reference`
non-empty when `requires_reference` is true, unique ids, strings within the size limit.
This module is standard library only (no grpc, no torch).
"""

from __future__ import annotations

import abc
import contextvars
import threading
import time
from collections.abc import Collection, Iterator
from concurrent import futures
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

_NEVER_SET = threading.Event()
_GONE_POLL_S = 0.05  # how soon wait_for_futures notices that the client has gone
_client_gone: contextvars.ContextVar[threading.Event] = contextvars.ContextVar(
    "client_gone", default=_NEVER_SET
)


def client_gone() -> threading.Event:
    """Set once the client of the Score call being served has gone away: it cancelled (a
    killed trainer's calls end so), its deadline passed, or the connection dropped.

    A verifier that queues work (worker processes, a batcher) can wait on it and drop what nobody
    will read; the servicer sets it up around `score` (outside a call it is never set). Raise
    `StatusError(grpc.StatusCode.CANCELLED, ...)` when you stop for it.
    """
    return _client_gone.get()


@contextmanager
def serving_call(gone: threading.Event) -> Iterator[None]:
    """Within the block, `client_gone()` on this thread returns `gone` (the servicer's side)."""
    token = _client_gone.set(gone)
    try:
        yield
    finally:
        _client_gone.reset(token)


def wait_for_futures(
    pending: Collection[Future], deadline_s: float | None, gone: threading.Event
) -> set[Future]:
    """Wait until every future in `pending` is done, `deadline_s` seconds have passed, or
    `gone` is set (usually `client_gone()`); return the futures not done (none: all done)."""
    end = None if deadline_s is None else time.monotonic() + deadline_s
    not_done = set(pending)
    while True:
        left = None if end is None else max(0.0, end - time.monotonic())
        # an Event cannot wake futures.wait: look at it between short waits
        _, not_done = futures.wait(
            not_done, timeout=_GONE_POLL_S if left is None else min(left, _GONE_POLL_S)
        )
        if not not_done or gone.is_set() or (end is not None and time.monotonic() >= end):
            return not_done


@dataclass
class SampleInput:
    """One (prompt, response) pair, as decoded from an rpp.v1.Sample."""

    id: str
    prompt: str
    response: str
    reference: str = ""
    """Ground truth; empty when the request carried none."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Free-form fields from the dataset row; ignore keys you do not know."""


@dataclass
class ScoreResult:
    """The reward of one sample and why, for logs."""

    reward: float
    """Scalar reward. Must be finite: the servicer refuses to send NaN or inf (INTERNAL)."""
    info: dict[str, str] = field(default_factory=dict)
    """Explanations, e.g. {"extracted_answer": "1/2", "error": "wrong_answer"}."""


class Verifier(abc.ABC):
    """A reward scorer. Subclass it, set the class attributes, implement `score`."""

    name: str = "verifier"
    """Human-readable name, reported by GetInfo (e.g. "math-verify" or a model path)."""
    kind: str = "verifier"
    """"verifier" (rule-based), "preference" (neural), or your own word."""
    version: str = "0"
    """Version of the scoring logic (package version, model revision)."""
    requires_reference: bool = False
    """True when every sample needs a non-empty `reference` (the servicer enforces it)."""

    @abc.abstractmethod
    def score(self, samples: list[SampleInput], deadline_s: float | None) -> list[ScoreResult]:
        """Score `samples`, returning one ScoreResult per sample in the same order.

        `deadline_s` is the time left before the client gives up (None: no deadline). A
        verifier that can stop early should; the servicer answers DEADLINE_EXCEEDED once it
        has passed either way. `client_gone()` tells when the client has given up for any
        reason (`wait_for_futures` waits on futures with both in mind). Raise
        `rpp_lightning.rpc.serving.StatusError` to end the call with a specific status; any other
        exception becomes INTERNAL.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Release processes, threads or devices. Called once when the server stops."""
