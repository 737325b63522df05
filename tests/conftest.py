"""Shared fixtures: tiny local models and real server processes on loopback ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (\S+)")


class ServerProcess:
    """A server CLI started as a child process; `address` is read from its `listening on` line.

    Output is collected in `self.output` (stdout and stderr together) for assertions and for
    failure messages.
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 120):
        self.argv = argv
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=ROOT,
        )
        self._address: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout_s) or self._address is None:
            self.stop()
            raise RuntimeError(f"{argv} did not start:\n" + "".join(self.output[-50:]))

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            match = _LISTENING.search(line)
            if match and self._address is None:
                self._address = match.group(1)
                self._ready.set()
        self._ready.set()  # process ended: unblock the waiter

    @property
    def address(self) -> str:
        assert self._address is not None
        return self._address

    @property
    def text(self) -> str:
        return "".join(self.output)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_server() -> Iterator:
    """Start server CLIs (`start_server([...argv])`); all are stopped at teardown."""
    started: list[ServerProcess] = []

    def start(argv: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(argv, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM + character tokenizer saved with save_pretrained."""
    from rpp_lightning.tiny import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_classifier_path(tmp_path_factory) -> Path:
    """A tiny random LlamaForSequenceClassification (1 label) + tokenizer."""
    from rpp_lightning.tiny import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-rm"))


def python_module(module: str, *args: str) -> list[str]:
    """argv running `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
