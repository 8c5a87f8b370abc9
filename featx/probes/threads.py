"""How many threads a probe runs on: sized to the work and to the cores this process may use.

torch runs an operation on a team of OpenMP threads that meet at a barrier when it ends. Where
other processes want the same cores, a thread of the team waits for its turn and the others wait
for it, once per operation. The batched solver runs thousands of small operations: on 2 cores
with two busy processes beside it, an operation of its shape and 0.86 GFLOP took 456 ms on two
threads against 45 ms on one (benchmarks/README.md, "solver_cost.py"); two threads paid only from
about 30 GFLOP. A barrier costs little beside an operation of tens of GFLOP, so an operation gets
one thread per FLOPS_PER_THREAD of its work, at most the cores this process may use
(`os.sched_getaffinity`), at most the cap (`--threads`; by default torch's own thread count,
which OMP_NUM_THREADS sets), and no more than the cores that other tasks leave idle when the probe
starts, plus its own (the tasks running or ready, from /proc/loadavg). A small problem, or a
probe on cores other processes keep busy, runs on one thread: no team, no barrier.

torch has no runtime switch for OpenMP's spin-waiting (OMP_WAIT_POLICY and GOMP_SPINCOUNT are
read once, when torch loads its OpenMP library); one thread is also what keeps a small probe from
spinning. The count is set for a stage of a probe and the previous count restored after it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from featx.errors import OptionError

FLOPS_PER_THREAD = 1e10  # an operation's floating-point work per thread (benchmarks/solver_cost.py)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; the machine's count where the system
    does not say)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(value: object) -> int | None:
    """A thread cap given by a user: None (featx decides), or a whole number from 1 to the cores
    this process may use; anything else is an OptionError."""
    if value is None:
        return None
    cores = available_cores()
    whole = isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip().isdigit()
    if not whole or not 1 <= int(value) <= cores:
        raise OptionError("threads", f"must be a whole number from 1 to {cores} (the cores this process "
                          f"may use), not {value!r}")
    return int(value)


def runnable_tasks() -> int | None:
    """Tasks the kernel has running or ready to run now, this one included (/proc/loadavg; the
    least of three readings a millisecond apart, so that a task passing through does not count);
    None where the system does not say."""
    readings = []
    for k in range(3):
        try:
            with open("/proc/loadavg") as f:
                readings.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
        if k < 2:
            time.sleep(0.001)
    return min(readings)


def thread_cap(threads: int | None = None) -> int:
    """The most threads a probe may use now: `threads` (checked already), else torch's own count;
    never more than the cores this process may use, nor more than its own core and the cores no
    other task is running or waiting on (a thread beyond those waits for a core, and the others
    wait for it)."""
    import torch

    cores = available_cores()
    running = runnable_tasks()
    free = cores if running is None else max(1, cores - running + 1)
    return max(1, min(threads or torch.get_num_threads(), cores, free))


def threads_for(flops: float, cap: int) -> int:
    """Threads for operations of `flops` floating-point operations each: one per FLOPS_PER_THREAD,
    at least 1, at most `cap`."""
    return max(1, min(cap, int(flops // FLOPS_PER_THREAD)))


@contextmanager
def running_on(threads: int) -> Iterator[int]:
    """torch's operations run on `threads` threads inside the block; the count before is restored
    after it (an exception included)."""
    import torch

    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
