"""WorkerPool: the process pool under the math verifier, with a hard per-task timeout."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import pytest
from conftest import wait_for
from reward_test_verifiers import pool_task

from reward_servers.worker_pool import (
    TIMED_OUT,
    CallerGone,
    DeadlinePassed,
    PoolClosed,
    TaskFailed,
    WorkerCrashed,
    WorkerPool,
)


@pytest.fixture
def pool():
    pool = WorkerPool(pool_task, workers=2, hard_timeout_s=1.0, preload=["reward_test_verifiers"])
    yield pool
    pool.close()


@pytest.fixture
def patient_pool():
    """A hard timeout longer than any test: only an abandonment can free its workers early."""
    pool = WorkerPool(pool_task, workers=2, hard_timeout_s=30.0, preload=["reward_test_verifiers"])
    yield pool
    pool.close()


@pytest.mark.timeout(60)
def test_results_in_order_in_parallel(patient_pool):
    pool = patient_pool
    start = time.monotonic()
    assert pool.map(["sleep:1", "sleep:1", "a"]) == ["SLEEP:1", "SLEEP:1", "A"]
    assert time.monotonic() - start < 1.8  # the two sleeps ran at the same time (not 2 s)


@pytest.mark.timeout(60)
def test_overrunning_task_is_killed_and_the_worker_replaced(pool):
    pids = {slot.process.pid for slot in pool.slots}
    start = time.monotonic()
    assert pool.map(["sleep:30", "b", "c"]) == [TIMED_OUT, "B", "C"]
    assert time.monotonic() - start < 5
    assert {slot.process.pid for slot in pool.slots} != pids
    assert pool.map(["d", "e"]) == ["D", "E"]


@pytest.mark.timeout(60)
def test_crash_and_task_errors_are_reported_and_the_pool_recovers(pool):
    with pytest.raises(WorkerCrashed):
        pool.map(["exit"])
    with pytest.raises(TaskFailed, match="ValueError: asked to raise"):
        pool.map(["raise"])
    assert pool.map(["f", "g", "h"]) == ["F", "G", "H"]


@pytest.mark.timeout(60)
def test_deadline_drops_queued_tasks(patient_pool):
    pool = patient_pool  # its running tasks finish rather than meet the hard timeout
    start = time.monotonic()
    with pytest.raises(DeadlinePassed, match="unfinished"):
        pool.map(["sleep:1"] * 6, deadline_s=0.3)
    assert time.monotonic() - start < 0.9  # not after the running tasks' 1 s
    time.sleep(1.0)  # the two running tasks finish; the four queued ones must not run
    start = time.monotonic()
    assert pool.map(["i", "j"], deadline_s=5) == ["I", "J"]
    assert time.monotonic() - start < 0.8  # queued tasks run would hold the workers 1 s


@pytest.mark.timeout(60)
def test_a_caller_that_goes_away_frees_the_workers_at_once(patient_pool):
    pool = patient_pool
    pids = {slot.process.pid for slot in pool.slots}
    gone = threading.Event()
    threading.Timer(0.3, gone.set).start()
    start = time.monotonic()
    # 5 of 6 when a slot has already answered its killed task's future with CallerGone
    with pytest.raises(CallerGone, match=r"[56] of 6 tasks unfinished"):
        pool.map(["sleep:20"] * 6, deadline_s=30, abandon=gone)
    assert time.monotonic() - start < 3  # noticed at once, not after the deadline
    # the two running tasks were killed (their workers replaced), the four queued ones dropped
    start = time.monotonic()
    assert pool.map(["k", "l"], deadline_s=5, abandon=threading.Event()) == ["K", "L"]
    assert time.monotonic() - start < 3  # not the 20 s of the killed tasks
    # (one slot may have run both while the other was still replacing its worker)
    assert wait_for(lambda: not pids & {s.process.pid for s in pool.slots if s.process}, 5)


@pytest.mark.timeout(60)
def test_close_cancels_queued_tasks_and_kills_running_ones(patient_pool):
    pool = patient_pool  # closed here; the fixture's close is then a no-op
    processes = [slot.process for slot in pool.slots]
    with futures.ThreadPoolExecutor(1) as caller:
        call = caller.submit(pool.map, ["sleep:20"] * 5)
        time.sleep(0.5)  # two tasks running, three queued
        start = time.monotonic()
        pool.close()
        with pytest.raises(PoolClosed):
            call.result(timeout=10)
        assert time.monotonic() - start < 3
    assert not any(process.is_alive() for process in processes)
    assert all(slot.process is None and not slot.thread.is_alive() for slot in pool.slots)
    with pytest.raises(PoolClosed):
        pool.map(["a"])


@pytest.mark.timeout(60)
def test_a_task_does_not_pay_for_its_workers_imports(patient_pool):
    """The fork server is the first pool's (patient_pool's here): a later pool's modules are
    imported by each worker, and that time is not counted against the task's hard timeout."""
    import slow_import_task

    pool = WorkerPool(
        slow_import_task.shout, workers=1, hard_timeout_s=0.5, preload=["slow_import_task"]
    )
    try:
        assert pool.map(["a"]) == ["A"]  # the worker imported for 1.5 s, then ran "a" at once
    finally:
        pool.close()
