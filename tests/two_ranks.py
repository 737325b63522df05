"""Run a test's worker on 2 spawned processes joined in one gloo process group."""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port


def run_on_two_ranks(worker: Callable[..., None], *args) -> None:
    """Call `worker(rank, *args)` on ranks 0 and 1 of a gloo group; raise if either fails.

    `worker` must be a module-level function (spawn pickles it by name).
    """
    mp.spawn(_rank_main, args=(worker, free_port(), args), nprocs=2, join=True)


def _rank_main(rank: int, worker: Callable[..., None], port: int, args: tuple) -> None:
    # A native abort in a child otherwise shows only as "terminated with signal SIGABRT".
    faulthandler.enable(all_threads=True)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        worker(rank, *args)
        dist.barrier()  # both ranks are done talking before either tears anything down
    finally:
        gc.collect()  # FSDP modules sit in reference cycles: free them while the group lives
        dist.destroy_process_group()
    # The worker's results are on disk, checked by the parent, so skip the interpreter's own
    # teardown. A rank of these tests aborted in torch's native code ("terminate called without
    # an active exception") once in CI and once in 25 runs on a loaded machine; native threads
    # meeting interpreter finalisation is the known cause of that message. If it recurs before
    # this line, faulthandler prints the rank's Python stack.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
