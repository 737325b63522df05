"""Math verifier: is the response's final answer equal to the reference? (HuggingFace math-verify)

    rpp-reward-server math --port 50051 --verifier-args workers=4 timeout_s=5

Per sample: extract the final answer (`\\boxed{...}` first, then the configured fallbacks, by
default "the answer is ..." and the last number), parse answer and reference with
`math_verify.parse` and compare with `math_verify.verify` (fractions = decimals, sets,
intervals, LaTeX, ...).

Timeouts. math-verify's own timeouts use `signal.alarm`, which only works on a process's main
thread: inside the server's gRPC threads they raise ValueError. So every sample runs on the main
thread of a worker process (`WorkerPool`), with two layers:
  * soft: a SIGALRM timer of `timeout_s` in the worker interrupts Python-level work (sympy
    simplifying `(10^8)!`), the worker answers "timeout" and stays alive;
  * hard: if the worker still has not answered `hard_grace_s` later (a C-level loop never
    returns to the interpreter, so no signal handler runs), the parent kills and replaces it.
Either way the sample scores `wrong_reward` (0 by default) with info["error"] = "timeout".

This module never imports torch.
"""

from __future__ import annotations

import os
import re
import signal
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from reward_servers.base import SampleInput, ScoreResult, Verifier, client_gone
from reward_servers.worker_pool import (
    TIMED_OUT,
    CallerGone,
    DeadlinePassed,
    PoolClosed,
    WorkerPool,
)
from rpp_lightning.rpc.serving import StatusError

FALLBACKS = ("boxed", "answer_is", "last_number")
"""Answer extraction methods, tried in order: \\boxed{...}, "the answer is ...", last number."""

# Every pattern here runs in time linear in the response: a policy in training emits long runs of
# spaces and thousands of open braces, and a quadratic regex on them stalls the worker for
# seconds. The answer after "answer is" is one character, then everything up to the end of its
# sentence: a newline, a period followed by white space, or the end. Each character after the
# first can be matched one way only, so the engine does not backtrack over it (the former lazy
# `(.+?)\s*` before the sentence's end did, quadratically in a run of spaces), and no two `\s*`
# stand side by side (`\s*:?\s*` splits a run of newlines in quadratically many ways).
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*(?::\s*)?([^\n](?:[^.\n]|\.(?=\S))*)", re.I)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


@dataclass(frozen=True)
class Verdict:
    """What a worker decides about one sample (the parent turns it into a reward)."""

    correct: bool
    answer: str = ""
    """The extracted final answer ("" when none was found)."""
    method: str = ""
    """How it was found: "boxed", "answer_is" or "last_number"."""
    error: str = ""
    """"" when correct; else no_answer_found, wrong_answer, parse_error or timeout."""


_KILLED = Verdict(False, error="timeout")


class _SampleTimeout(BaseException):
    # BaseException: math-verify and sympy catch `Exception` broadly and would swallow it.
    pass


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} that is closed (nested braces allowed), or None.

    One pass with a stack of open braces: linear in the text, whatever its braces."""
    openers = {match.end() - 1 for match in _BOXED.finditer(text)}  # the "{" of each \\boxed{
    if not openers:
        return None
    stack: list[int] = []
    last: tuple[int, int] | None = None  # (start, end) of the closed \\boxed{} opened last
    for i, char in enumerate(text):
        if char == "{":
            stack.append(i)
        elif char == "}" and stack:
            start = stack.pop()
            if start in openers and (last is None or start > last[0]):
                last = (start, i)
    return None if last is None else text[last[0] + 1 : last[1]].strip()


def extract_answer(text: str, fallbacks: tuple[str, ...] = FALLBACKS) -> tuple[str, str] | None:
    """(answer, method) of the final answer in `text`: the first of `fallbacks` that finds one."""
    for method in fallbacks:
        if method == "boxed":
            answer = extract_boxed(text) or ""
        elif method == "answer_is":
            found = _ANSWER_IS.findall(text)
            answer = found[-1].strip().strip("$").strip() if found else ""
        elif method == "last_number":
            found = _NUMBER.findall(text)
            answer = found[-1].replace(",", "") if found else ""
        else:
            raise ValueError(f"unknown extraction method {method!r}; known: {', '.join(FALLBACKS)}")
        if answer:
            return answer, method
    return None


def _as_latex(text: str) -> str:
    # math-verify's LaTeX extraction needs an anchor: bare `\frac12` or `(0,1]` parse to nothing.
    return text if "$" in text or "\\boxed" in text else f"${text}$"


class _ReferenceCache:
    """Parsed references of one worker, least recently used first out, bounded in characters.

    References repeat (several samples per prompt), so each is parsed once per worker. The bound
    is on size, not count: 4096 entries of a megabyte each would keep gigabytes in every worker.
    A reference longer than a tenth of the budget is parsed every time instead of cached.
    """

    def __init__(self, max_chars: int = 2_000_000) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self.entries: OrderedDict[str, list] = OrderedDict()

    def get(self, reference: str) -> list:
        if reference in self.entries:
            self.entries.move_to_end(reference)
            return self.entries[reference]
        from math_verify import parse

        parsed = parse(_as_latex(reference), parsing_timeout=None)
        if len(reference) <= self.max_chars // 10:
            self.entries[reference] = parsed
            self.chars += len(reference)
            while self.chars > self.max_chars:
                evicted, _ = self.entries.popitem(last=False)
                self.chars -= len(evicted)
        return parsed


_references = _ReferenceCache()


def verify_one(task: tuple[str, str, tuple[str, ...], float]) -> Verdict:
    """Decide one sample. Call it on a process's main thread: its timeout uses SIGALRM.

    Every step that reads the response, extraction included, runs under the time limit."""
    from math_verify import parse, verify

    response, reference, fallbacks, timeout_s = task

    def on_alarm(signum, frame):
        raise _SampleTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm) if timeout_s > 0 else None
    answer = method = ""
    try:
        if timeout_s > 0:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        found = extract_answer(response, fallbacks)
        if found is None:
            return Verdict(False, error="no_answer_found")
        answer, method = found
        # math-verify's own signal timeouts are off (None): ours covers parse and verify together.
        gold = _references.get(reference)
        if not gold:
            return Verdict(False, answer, method, "parse_error")  # the reference, not the answer
        predicted = parse(f"${answer.strip('$')}$", parsing_timeout=None)
        if not predicted:
            return Verdict(False, answer, method, "parse_error")
        correct = verify(gold, predicted, timeout_seconds=None)
        # parse() falls back to the raw string when LaTeX parsing fails; a wrong verdict on
        # strings alone means the answer was unparsable rather than a wrong value.
        parsed = any(not isinstance(p, str) for p in predicted)
        error = "" if correct else ("wrong_answer" if parsed else "parse_error")
        return Verdict(correct, answer, method, error)
    except _SampleTimeout:
        return Verdict(False, answer, method, "timeout")
    except Exception:  # math-verify treats a failure to compare as "not equal"; so do we
        return Verdict(False, answer, method, "parse_error")
    finally:
        if timeout_s > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _quiet_math_verify() -> None:
    # With its timeouts off, math-verify warns once per process that we must handle timeouts
    # ourselves; we do (above), so keep the worker logs clean.
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)


class MathVerifier(Verifier):
    """Rule-based math verifier; `score` fans samples out over a pool of worker processes."""

    name = "math-verify"
    kind = "verifier"
    requires_reference = True

    def __init__(
        self,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        format_reward: float = 0.0,
        fallbacks: tuple[str, ...] | list[str] = FALLBACKS,
        workers: int | None = None,
        timeout_s: float = 5.0,
        hard_grace_s: float = 2.0,
        soft_timeout: bool = True,
    ) -> None:
        """
        Args:
            correct_reward: reward of a correct final answer.
            wrong_reward: reward of a wrong, missing, unparsable or timed-out answer.
            format_reward: added when the answer was given in \\boxed{...} (the asked format).
            fallbacks: extraction methods in order; ("boxed",) accepts boxed answers only.
            workers: worker processes (default: CPUs available to this process).
            timeout_s: per-sample time budget (soft SIGALRM timeout in the worker).
            hard_grace_s: a worker silent for timeout_s + hard_grace_s is killed and replaced.
            soft_timeout: False disables the SIGALRM layer (tests of the hard layer only).
        """
        from importlib.metadata import version as package_version

        self.version = f"math-verify {package_version('math-verify')}"
        self.fallbacks = tuple(fallbacks)
        extract_answer("", self.fallbacks)  # validate names now, not on the first request
        self.correct_reward = float(correct_reward)
        self.wrong_reward = float(wrong_reward)
        self.format_reward = float(format_reward)
        self.timeout_s = float(timeout_s)
        self.soft_timeout_s = self.timeout_s if soft_timeout else 0.0
        workers = workers or len(os.sched_getaffinity(0))
        self.pool = WorkerPool(
            _worker_fn,
            workers=workers,
            hard_timeout_s=self.timeout_s + hard_grace_s,
            preload=["reward_servers.math_verifier", "math_verify"],
        )

    def verdicts(self, samples: list[SampleInput], deadline_s: float | None) -> list[Verdict]:
        """One Verdict per sample, computed in the worker processes."""
        tasks = [(s.response, s.reference, self.fallbacks, self.soft_timeout_s) for s in samples]
        try:
            results = self.pool.map(tasks, deadline_s, client_gone())
        except CallerGone as exc:  # nobody will read the verdicts: the pool dropped the rest
            raise StatusError(
                grpc.StatusCode.CANCELLED,
                f"the client went away while {len(samples)} samples were verified ({exc})",
            ) from exc
        except DeadlinePassed as exc:
            raise StatusError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline passed while verifying {len(samples)} samples ({exc})",
            ) from exc
        except PoolClosed as exc:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down") from exc
        # A killed worker's verdict is lost with it. The server process never reads a response
        # itself (that is what the time limit guards), so no extracted answer is reported.
        return [_KILLED if r == TIMED_OUT else r for r in results]

    def score(self, samples: list[SampleInput], deadline_s: float | None) -> list[ScoreResult]:
        """Rewards from verdicts: correct/wrong reward plus the format reward for \\boxed."""
        results = []
        for verdict in self.verdicts(samples, deadline_s):
            reward = self.correct_reward if verdict.correct else self.wrong_reward
            if verdict.method == "boxed" and verdict.error != "timeout":
                reward += self.format_reward
            info = {
                "correct": "true" if verdict.correct else "false",  # the trainer logs accuracy
                "extracted_answer": verdict.answer,
                "method": verdict.method,
            }
            if verdict.error:
                info["error"] = verdict.error
            results.append(ScoreResult(reward, info))
        return results

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()


def _worker_fn(task: tuple[str, str, tuple[str, ...], float]) -> Verdict:
    _quiet_math_verify()
    try:
        return verify_one(task)
    except _SampleTimeout:  # the alarm fired in the instant between scoring and disarming it
        return Verdict(False, error="timeout")
