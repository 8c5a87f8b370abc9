"""Which solver fits a linear SVM faster on a layer: a small cost model of both (`--solver auto`).

Both solvers give the same classifier (featx.probes.svm); only their time differs, and neither is
faster everywhere. The torch solver fits every C and fold as one batched problem: a fixed cost,
its many small operations (Newton and conjugate-gradient steps along a path of C values), plus
arithmetic that the thread policy (featx.probes.threads) spreads over threads only where the
operations are large. liblinear fits each C and fold on its own in worker threads: a cost per fit
plus arithmetic, shared by the workers, which wait on nothing. Each side's arithmetic grows with
its work, problems x classes x rows x (width + 1), at a rate of its own in kernel form (the
training rows are separable there, which lengthens liblinear's path to a large C) and in the
primal, and by a power of the work below 1 (larger matrix products run faster per value):

    torch     = TORCH_FIXED + TORCH_SECONDS[form] * (work / WORK_UNIT) ** TORCH_EXPONENT / torch threads
    liblinear = (problems * LIBLINEAR_PER_FIT
                 + LIBLINEAR_SECONDS[form] * (work / WORK_UNIT) ** LIBLINEAR_EXPONENT) / workers

Both are given the probe's thread cap (featx.probes.threads: the cores this process may use that
other tasks leave free, at most `--threads`): liblinear's workers help only on free cores, so a
layer may go to liblinear on a quiet machine and to the torch solver on a busy one.

The constants are least-squares fits (of the logarithm of estimate over measurement) to both
solvers timed on one thread each on synthetic and cached layers, from the demo's 48 training rows
to 15-Scene's 1,500 (benchmarks/solver_cost.py; benchmarks/README.md gives the CPU and the
figures). On a GPU the torch solver is kept: its constants there are unmeasured. Under torchrun
the torch solver is kept too: it is the one that takes rows split between ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from featx.probes.threads import threads_for

WORK_UNIT = 1e6
TORCH_FIXED = 0.0866  # seconds: a batched solve's small operations, whatever its size
TORCH_SECONDS = {"kernel": 0.01103, "primal": 0.03545}  # per WORK_UNIT of work, on one thread
TORCH_EXPONENT = 0.8718
LIBLINEAR_PER_FIT = 0.001365  # seconds: one LinearSVC fit's own cost
LIBLINEAR_SECONDS = {"kernel": 0.05794, "primal": 0.02953}  # per WORK_UNIT of work, on one thread
LIBLINEAR_EXPONENT = 0.9677


@dataclass(frozen=True)
class SolveShape:
    """What a linear probe's solve costs depend on."""

    rows: int  # training rows
    width: int  # columns the solver sees: the layer's values, or (kernel form) the training rows
    classes: int
    problems: int  # C values x folds, plus the final fit
    kernel_form: bool
    device: str = "cpu"

    @property
    def work(self) -> float:
        """problems x one-vs-rest units x rows x (width + 1): one pass of every problem's scores."""
        units = 1 if self.classes == 2 else self.classes
        return float(self.problems) * units * self.rows * (self.width + 1)

    @property
    def form(self) -> str:
        return "kernel" if self.kernel_form else "primal"

    def op_flops(self) -> float:
        """Floating-point operations of the torch solver's largest operation (all problems' scores)."""
        return 2 * self.work


def torch_threads(shape: SolveShape, cap: int) -> int:
    """Threads for the torch solver's operations (featx.probes.threads)."""
    return threads_for(shape.op_flops(), cap)


def liblinear_workers(shape: SolveShape, cap: int) -> int:
    """liblinear's worker threads: one per fit, at most `cap`."""
    return max(1, min(shape.problems, cap))


def torch_seconds(shape: SolveShape, cap: int) -> float:
    """Estimated seconds of the torch solver on a CPU, with at most `cap` threads."""
    arithmetic = TORCH_SECONDS[shape.form] * (shape.work / WORK_UNIT) ** TORCH_EXPONENT
    return TORCH_FIXED + arithmetic / torch_threads(shape, cap)


def liblinear_seconds(shape: SolveShape, cap: int) -> float:
    """Estimated seconds of liblinear (on the CPU), with at most `cap` workers."""
    arithmetic = LIBLINEAR_SECONDS[shape.form] * (shape.work / WORK_UNIT) ** LIBLINEAR_EXPONENT
    return (shape.problems * LIBLINEAR_PER_FIT + arithmetic) / liblinear_workers(shape, cap)


def faster_solver(shape: SolveShape, cap: int, *, several_ranks: bool = False) -> str:
    """`torch` or `liblinear`: the one the cost model finds faster for this solve (torch on a GPU
    and under torchrun, see the module docstring)."""
    if shape.device != "cpu" or several_ranks:
        return "torch"
    return "liblinear" if liblinear_seconds(shape, cap) < torch_seconds(shape, cap) else "torch"
