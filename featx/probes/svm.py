"""Linear SVM per layer: LinearSVC's own objective (L2-regularised squared hinge, one-vs-rest,
the bias regularised as a feature of constant 1), C by cross-validation over C_GRID.

Two solvers give the same classifier (tests and benchmarks/svm.py compare them):
- `torch` (featx.probes.solvers): every class, every C and every fold as one batched truncated
  Newton problem, on the GPU or the CPU;
- `liblinear`: scikit-learn's LinearSVC in the primal (trust-region Newton), one fit per C and
  fold, in threads.
`auto` picks, per layer, the one a small cost model finds faster for the solve's shape (rows,
width, classes, C values x folds, kernel form or primal, device) and for the cores free when the
probe starts (featx.probes.costs, featx.probes.threads). Neither wins everywhere
(benchmarks/README.md): liblinear on small problems, where the torch solver's many small
operations cost more than its arithmetic (the demo's 48 training rows: 0.02 s against 0.05 s),
and on 15-Scene's narrower primal layers where two cores are free for its fits; the torch solver
in kernel form from a few hundred training rows (VGG16's 4096-wide layers of 15-Scene: 6 to 9x
faster), on large problems (100 classes and 10,000 training rows of 2048 values: 65 s, where
liblinear had not finished after 5 minutes), where the cores are taken, and on the GPU. The
layer is streamed and fitted in kernel form when it has more values than training rows
(featx.probes.linear).
"""

from __future__ import annotations

from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC

from featx.data.splits import Split
from featx.options import Solver
from featx.probes import Probe, ProbeOptions, ProbeResult, register
from featx.probes.costs import SolveShape, faster_solver
from featx.probes.linear import Pick, as_fitted, fitted_scaler, liblinear_pick, train_linear
from featx.probes.solvers import fit_squared_hinge, working_bytes
from featx.probes.stream import LayerStream

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def pick_solver(options: ProbeOptions, shape: SolveShape, cap: int, *, several_ranks: bool = False) -> Pick:
    """The solver asked for, or under `auto` the faster for this solve by the cost model (see the
    module docstring)."""
    name = options.solver.value
    if options.solver == Solver.AUTO:
        name = faster_solver(shape, cap, several_ranks=several_ranks)
    if name == "liblinear":
        return liblinear_pick(shape, cap, seed=options.seed)
    return "torch", fit_squared_hinge, working_bytes


def train_layer(stream: LayerStream, split: Split, options: ProbeOptions,
                ) -> tuple[ProbeResult, Pipeline]:
    """Train and test a linear SVM on one layer; returns the result and the fitted model, which
    applies to the layer's raw values."""
    several = stream.ranks.several
    result, weights, intercept = train_linear(
        stream, split, options, probe="svm", grid=C_GRID,
        pick=lambda shape, cap: pick_solver(options, shape, cap, several_ranks=several))
    clf = as_fitted(LinearSVC(C=result.C), stream, weights, intercept=intercept)
    return result, Pipeline([("scale", fitted_scaler(stream)), ("svm", clf)])


register(Probe("svm", "Linear SVM", "LinearSVC's objective (squared hinge, one-vs-rest)", train_layer))
