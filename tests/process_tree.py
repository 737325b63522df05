"""Process trees read from /proc (Linux), as `ps --ppid` would: who started what, who is left."""

from __future__ import annotations

import os
import signal
from pathlib import Path

SERVER_MODULES = ("rpp_lightning.generation.cli", "reward_servers.cli")


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live process below `root`."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents.setdefault(stat[0], []).append(int(entry))
            starts[int(entry)] = stat[2]
    found, todo = {}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(processes: dict[int, int]) -> list[int]:
    """The pids of `processes` still running (the same process: same start time; not a zombie)."""
    out = []
    for pid, start in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start and stat[1] != "Z":
            out.append(pid)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Tree:
    """Every process ever seen below `root` (a trainer, a server), with its command line."""

    def __init__(self, root: int) -> None:
        self.root, self.seen, self.commands = root, {}, {}

    def poll(self) -> None:
        for pid, start in descendants(self.root).items():
            # re-read: between fork and exec a child has no (or its parent's) command line
            self.commands[pid] = cmdline(pid) or self.commands.get(pid, "")
            self.seen[pid] = start

    def servers(self) -> list[str]:
        """The server modules among the live direct children of the trainer."""
        return [
            module
            for pid in alive(self.seen)
            if (stat := _stat(pid)) is not None and stat[0] == self.root
            for module in SERVER_MODULES
            if module in self.commands[pid]
        ]

    def started(self, module: str) -> bool:
        return any(module in command for command in self.commands.values())

    def survivors(self) -> list[str]:
        return [self.commands[pid] for pid in alive(self.seen)]

    def kill_survivors(self) -> None:
        for pid in alive(self.seen):  # never leave a test's processes behind, even on failure
            os.kill(pid, signal.SIGKILL)
