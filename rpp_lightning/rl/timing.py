"""Phase times of an iteration (`time/...` metrics, algorithm.md §7) and the generation servers'
idle time. A module of its own so that every part that times a phase (the rollout source, the
experience maker, the module) can use it without importing the metrics, which import them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Record the wall time of the block as `timings[phase]` (seconds)."""
    start = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - start


class BusyClock:
    """When generation calls were in flight, to tell how long the servers had nothing to do."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[list[float]] = []  # [start, end]; end is inf while running

    @contextmanager
    def busy(self) -> Iterator[None]:
        span = [time.perf_counter(), float("inf")]
        with self._lock:
            self._spans.append(span)
        try:
            yield
        finally:
            span[1] = time.perf_counter()

    def idle_between(self, start: float, end: float) -> float:
        """Seconds of [start, end] with no call in flight; forgets calls that ended before."""
        with self._lock:
            self._spans = [s for s in self._spans if s[1] > start]
            spans = sorted((max(s[0], start), min(s[1], end)) for s in self._spans)
        busy, reached = 0.0, start
        for span_start, span_end in spans:
            span_start = max(span_start, reached)
            if span_end > span_start:
                busy += span_end - span_start
                reached = span_end
        return max(0.0, end - start - busy)
