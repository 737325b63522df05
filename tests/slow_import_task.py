"""A WorkerPool task whose module takes 1.5 s to import, as sympy's does on a slow machine."""

import time

time.sleep(1.5)


def shout(task: str) -> str:
    return task.upper()
