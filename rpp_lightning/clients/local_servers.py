"""Start servers as child processes on free loopback ports, and never leave them behind.

The embedded default: a config that asks for it gets a local generation server and local reward
servers started next to the trainer, health-checked, and stopped when training ends, fails or is
interrupted. Each child runs the same CLI a separate deployment would (`rpp-generation-server`,
`rpp-reward-server`), so the embedded setup exercises the real architecture.

Children are tied to the parent three ways: explicit `stop()`, an `atexit` hook, and on Linux
PR_SET_PDEATHSIG, which makes the kernel send SIGTERM to a child if its parent dies even by
SIGKILL (the child asks for it at start: `serving.die_with_parent_if_asked`).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence

from rpp_lightning.rpc.serving import PARENT_PID_ENV

log = logging.getLogger("rpp.local_servers")
_LISTENING = re.compile(r"listening on (\S+)")
_LIVE: weakref.WeakSet[ChildServer] = weakref.WeakSet()


class ChildServer:
    """A server CLI run as a child process; `address` comes from its `listening on` line.

    stdout and stderr are collected in `output` (the last lines go into start-up errors) and
    echoed to this process's log at DEBUG level.
    """

    def __init__(
        self,
        argv: Sequence[str],
        name: str = "server",
        env: dict[str, str] | None = None,
        start_timeout_s: float = 300.0,
        cwd: str | None = None,
        wait: bool = True,
    ) -> None:
        """`wait=False` returns once the process runs; call `wait_ready` before `address` (so
        several servers start at once: each spends seconds importing its libraries)."""
        self.argv, self.name = list(argv), name
        self.output: list[str] = []
        self._address: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # the server CLI sets PR_SET_PDEATHSIG itself (serving.die_with_parent_if_asked)
            env={
                **os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid()),
                **(env or {}),
            },
            cwd=cwd,
        )  # fmt: skip
        _LIVE.add(self)
        threading.Thread(target=self._pump, daemon=True, name=f"{name}-log").start()
        self._start_timeout_s = start_timeout_s
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the server printed its address; RuntimeError (it is stopped) if not."""
        if not self._ready.wait(self._start_timeout_s) or self._address is None:
            self.stop(timeout_s=5)
            tail = "".join(self.output[-30:])
            raise RuntimeError(f"{self.name} ({' '.join(self.argv)}) did not start:\n{tail}")
        log.info("%s listening on %s (pid %d)", self.name, self._address, self.proc.pid)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            log.debug("[%s] %s", self.name, line.rstrip())
            match = _LISTENING.search(line)
            if match and self._address is None:
                self._address = match.group(1)
                self._ready.set()
        self._ready.set()  # the process ended: wake the waiter

    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError(f"{self.name} has no address (not started)")
        return self._address

    @property
    def text(self) -> str:
        return "".join(self.output)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (the server drains in-flight calls), then SIGKILL after `timeout_s`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait()
        _LIVE.discard(self)
        return self.proc.returncode


@atexit.register
def stop_all_children() -> None:
    """Stop every child server still running (also called on normal interpreter exit)."""
    children = [child for child in list(_LIVE) if child.proc.poll() is None]
    for child in children:  # all drain at once, not one after another
        child.proc.send_signal(signal.SIGTERM)
    for child in children:
        child.stop(timeout_s=10)


def generation_server_argv(model_path: str, extra: Sequence[str] = ()) -> list[str]:
    """argv of a loopback transformers generation server on a free port."""
    return [
        sys.executable,
        "-m",
        "rpp_lightning.generation.cli",
        "--backend",
        "transformers",
        "--model",
        model_path,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *extra,
    ]


def reward_server_argv(kind: str, extra: Sequence[str] = ()) -> list[str]:
    """argv of a loopback reward server on a free port.

    `kind` is "math", "preference", or a user verifier "module:Class".
    """
    which = ["--verifier", kind] if ":" in kind else [kind]
    return [
        sys.executable,
        "-m",
        "reward_servers.cli",
        *which,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *extra,
    ]
