"""User verifiers for trainer tests, served by the real `rpp-reward-server --verifier` runner.

A random tiny policy almost never answers arithmetic correctly, so a 0/1 verifier would give all
rewards equal and every advantage zero. This verifier gives graded rewards, so updates move.
"""

from __future__ import annotations

import time

from reward_servers.base import SampleInput, ScoreResult, Verifier


class DigitShareVerifier(Verifier):
    """Reward = share of digit characters in the response; "correct" when it holds the reference."""

    name = "digit-share"
    kind = "verifier"
    version = "1"

    def __init__(self) -> None:
        self.calls = 0  # lets tests see which replica served a call

    def score(self, samples: list[SampleInput], deadline_s: float | None) -> list[ScoreResult]:
        self.calls += 1
        results = []
        for sample in samples:
            digits = sum(ch.isdigit() for ch in sample.response)
            correct = bool(sample.reference) and sample.reference in sample.response
            info = {"correct": "true" if correct else "false"}
            results.append(ScoreResult(digits / len(sample.response), info))
        return results


class SlowDigitShareVerifier(DigitShareVerifier):
    """DigitShareVerifier that takes SECONDS per Score call, like a busy reward model."""

    SECONDS = 1.0  # ~20× the log-probs of the overlap test (0.05 s): they stay hidden under load

    def score(self, samples: list[SampleInput], deadline_s: float | None) -> list[ScoreResult]:
        time.sleep(self.SECONDS)
        return super().score(samples, deadline_s)
