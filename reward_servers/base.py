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
from dataclasses import dataclass, field


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
        has passed either way. Raise `rpp_lightning.serving.StatusError` to end the call with a
        specific status; any other exception becomes INTERNAL.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Release processes, threads or devices. Called once when the server stops."""
