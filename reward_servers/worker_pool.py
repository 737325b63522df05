"""A process pool with a hard per-task timeout: a stuck task costs one worker, never the batch.

`concurrent.futures.ProcessPoolExecutor` cannot stop one task: killing a worker breaks the
whole pool. Here each worker process has one parent-side thread that feeds it tasks one at a
time from a shared queue. When a task overruns `hard_timeout_s` the thread SIGKILLs the process,
starts a fresh one and reports `TIMED_OUT` for that task; the other workers keep going. The
same happens to the running tasks of a caller that has gone away (`map(..., abandon=event)`).

Processes come from a `forkserver`: forking the gRPC server process itself (threads, locks held
mid-call) is unsafe, and the fork server preloads `preload` modules once, so replacing a killed
worker takes milliseconds instead of re-importing sympy. A process has one fork server, started
by its first pool: a later pool's `preload` is imported by each of its workers instead, and
the hard timeout of a worker's first task starts only once the worker has said it is ready.

    pool = WorkerPool(my_module.fn, workers=2, hard_timeout_s=5.0, preload=["my_module"])
    results = pool.map([task1, task2], deadline_s=10.0)  # fn(task) or TIMED_OUT each
    pool.close()
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

from reward_servers.base import wait_for_futures

log = logging.getLogger("rpp.reward.pool")

_ABANDON_LOOK_S = 0.05  # how often a slot running a task looks whether its caller has gone
_STARTUP_TIMEOUT_S = 120.0  # a worker importing its modules afresh (sympy: seconds, not minutes)
_READY = "ready"

TIMED_OUT = "timed_out"
"""Result of a task whose worker was killed for overrunning hard_timeout_s."""


class DeadlinePassed(Exception):
    """The caller's deadline passed before every task finished; pending tasks were dropped."""


class CallerGone(Exception):
    """The caller's `abandon` event was set before every task finished; queued tasks were
    dropped, running ones killed."""


class PoolClosed(Exception):
    """The pool was closed (the server is shutting down) before every task finished."""


class WorkerCrashed(Exception):
    """A worker process died (not by our timeout) while running a task."""


class TaskFailed(Exception):
    """`fn` raised in the worker; the message is the worker's `Type: message`."""


def _worker_main(conn, fn: Callable[[Any], Any], preload: Sequence[str]) -> None:
    """Loop in the worker process: receive a task, run it on this main thread, send the result.

    Running on the process's main thread is what lets `fn` use SIGALRM-based timeouts.
    """
    for module in preload:  # already there when this pool's preload started the fork server
        importlib.import_module(module)
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            conn.send((True, fn(task)))
        except BaseException as exc:  # anything fn raises is the task's result, not our crash
            conn.send((False, f"{type(exc).__name__}: {exc}"))


def _next_look(end: float, abandon: threading.Event | None) -> float:
    """Seconds to wait for a worker's answer before looking at the deadline and `abandon`."""
    left = max(0.0, end - time.monotonic())
    return left if abandon is None else min(left, _ABANDON_LOOK_S)


class _Slot:
    """One worker process and the parent thread that owns it.

    `lock` guards `process` and `conn`: the slot thread replaces a killed worker while `close()`
    may be killing it from another thread, and a worker must never be started after close.
    """

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.lock = threading.Lock()
        self.process = None
        self.conn = None
        self.ready = False  # the process has sent _READY: its imports are done
        self.thread = threading.Thread(target=self.run, name=f"worker-slot-{index}", daemon=True)

    def spawn(self) -> None:
        with self.lock:
            if self.pool.closed:
                raise PoolClosed("the pool is closed")
            parent_conn, child_conn = self.pool.context.Pipe()
            process = self.pool.context.Process(
                target=_worker_main,
                args=(child_conn, self.pool.fn, self.pool.preload),
                daemon=True,
                name=f"reward-worker-{self.index}",
            )
            process.start()
            child_conn.close()
            self.process, self.conn, self.ready = process, parent_conn, False

    def kill(self) -> None:
        with self.lock:
            process, conn = self.process, self.conn
            self.process = self.conn = None
        if process is not None:
            process.kill()
            process.join()
            conn.close()

    def run(self) -> None:
        while True:
            item = self.pool.tasks.get()
            if item is None:
                return
            future, task, abandon = item
            if not future.set_running_or_notify_cancel():
                continue  # its request gave up (deadline, shutdown); skip the work
            error: Exception | None = None
            try:
                result = self.run_one(task, abandon)
            except (TaskFailed, CallerGone) as exc:  # the task's own end: nothing is broken
                error = exc
            except Exception as exc:  # never let this thread die with a future unresolved
                if self.pool.closed:  # close() killed the worker under this task
                    error = PoolClosed("the pool was closed while the task ran")
                else:
                    log.error("worker %d failed: %s; replacing it", self.index, exc)
                    error = WorkerCrashed(f"worker process failed: {exc}")
                self.kill()
            if self.process is None and not self.pool.closed:
                try:
                    self.spawn()  # replace it before answering: the next task finds it ready
                except PoolClosed:
                    pass
                except Exception:
                    log.exception("worker %d could not restart; retrying on next task", self.index)
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def run_one(self, task: Any, abandon: threading.Event | None) -> Any:
        """fn(task) in this slot's process; TIMED_OUT after killing it if it overruns, and
        CallerGone after killing it if `abandon` is set meanwhile (nobody reads the result)."""
        if self.process is None:
            self.spawn()
        conn = self.conn
        if conn is None:  # killed by close() since the line above
            raise PoolClosed("the pool is closed")
        if not self.ready:  # the hard timeout is the task's: it must not pay for the imports
            if not conn.poll(_STARTUP_TIMEOUT_S):
                raise RuntimeError(f"not ready after {_STARTUP_TIMEOUT_S:.0f}s")
            if conn.recv() != _READY:  # EOFError if it died while importing
                raise RuntimeError("the worker's first message was not 'ready'")
            self.ready = True
        conn.send(task)
        end = time.monotonic() + self.pool.hard_timeout_s
        while not conn.poll(_next_look(end, abandon)):
            if abandon is not None and abandon.is_set():
                self.kill()
                raise CallerGone("the caller went away while the task ran")
            if time.monotonic() >= end:
                log.warning(
                    "worker %d overran %.1fs: killed and replaced",
                    self.index,
                    self.pool.hard_timeout_s,
                )
                self.kill()
                return TIMED_OUT
        ok, value = conn.recv()  # EOFError if the process died (e.g. out of memory)
        if not ok:
            raise TaskFailed(value)
        return value


class WorkerPool:
    """`workers` processes running `fn(task)`, each task killed after `hard_timeout_s`."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        workers: int,
        hard_timeout_s: float,
        preload: Sequence[str] = (),
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.fn = fn
        self.preload = list(preload)
        self.hard_timeout_s = hard_timeout_s
        self.closed = False
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(self.preload)  # if this pool starts the fork server
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.slots = [_Slot(self, i) for i in range(workers)]
        for slot in self.slots:
            slot.spawn()  # start every worker now: the first request should not pay for it
            slot.thread.start()

    def map(
        self,
        tasks: Sequence[Any],
        deadline_s: float | None = None,
        abandon: threading.Event | None = None,
    ) -> list[Any]:
        """Run `fn` on every task in parallel; results in order (TIMED_OUT for killed ones).

        Raises DeadlinePassed when `deadline_s` seconds pass first (queued tasks are dropped,
        running ones finish within hard_timeout_s), CallerGone when `abandon` is set first
        (queued tasks are dropped, running ones killed), PoolClosed when the pool is closed
        meanwhile, WorkerCrashed when a worker died, TaskFailed when `fn` raised.
        """
        if self.closed:
            raise PoolClosed("the pool is closed")
        pending = [futures.Future() for _ in tasks]
        for future, task in zip(pending, tasks, strict=True):
            self.tasks.put((future, task, abandon))
        start = time.monotonic()
        not_done = wait_for_futures(pending, deadline_s, abandon or threading.Event())
        if not_done:
            for future in not_done:
                future.cancel()  # the slot that takes it skips it
            unfinished = f"{len(not_done)} of {len(tasks)} tasks unfinished"
            if deadline_s is not None and time.monotonic() - start >= deadline_s:
                raise DeadlinePassed(unfinished)
            raise CallerGone(unfinished)
        if any(future.cancelled() for future in pending):  # close() dropped them from the queue
            raise PoolClosed("the pool was closed before every task ran")
        return [future.result() for future in pending]

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop now: queued tasks are cancelled and running ones killed (their callers get
        PoolClosed). Called after the gRPC drain, when no caller is left to read a result."""
        if self.closed:
            return
        self.closed = True
        while True:
            try:
                item = self.tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
                item[0].set_running_or_notify_cancel()  # what wakes futures.wait() in map()
        for slot in self.slots:
            self.tasks.put(None)
            slot.kill()
        end = time.monotonic() + timeout_s
        for slot in self.slots:
            slot.thread.join(max(0.0, end - time.monotonic()))
