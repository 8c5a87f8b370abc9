"""Busy processes beside a benchmark: what a shared machine looks like to featx."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

# one core each: a numpy matrix product in a loop (BLAS on one thread), or a pure-Python loop
SPINNERS = {
    "matmul": "import numpy as np\na = np.random.rand(256, 256)\nwhile True:\n    a = (a @ a) / 256",
    "python": "x = 0\nwhile True:\n    x = (x + 1) % 1000003",
}


@contextmanager
def busy(count: int) -> Iterator[list[subprocess.Popen]]:
    """`count` processes spinning on the CPU (numpy matmul and pure-Python loops in turn) for the
    duration of the block; each is killed, by its own id, when the block ends."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    kinds = list(SPINNERS)
    started = [subprocess.Popen([sys.executable, "-c", SPINNERS[kinds[k % len(kinds)]]], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for k in range(count)]
    try:
        time.sleep(0.5 if count else 0)  # running before the first measurement
        yield started
    finally:
        for process in started:
            process.kill()
        for process in started:
            process.wait()


def load_average() -> float:
    """The machine's load over the last minute (other users' work included)."""
    return os.getloadavg()[0]
