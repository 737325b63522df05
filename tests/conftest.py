"""Shared fixtures: tiny local models and real server processes on loopback ports."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rpp_lightning.clients.local_servers import ChildServer

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port free right now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess(ChildServer):
    """A server CLI run as a child process from the repository root (see ChildServer).

    `address` comes from its `listening on` line; `output`/`text` hold its stdout and stderr.
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 120):
        super().__init__(argv, name=argv[0], env=env, start_timeout_s=timeout_s, cwd=str(ROOT))


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
