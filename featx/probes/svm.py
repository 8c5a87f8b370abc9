"""Linear SVM per layer: LinearSVC's own objective (L2-regularised squared hinge, one-vs-rest,
the bias regularised as a feature of constant 1), C by cross-validation over C_GRID.

Two solvers give the same classifier (tests and benchmarks/svm.py compare them):
- `torch` (featx.probes.solvers): every class, every C and every fold as one batched truncated
  Newton problem, on the GPU or the CPU;
- `liblinear`: scikit-learn's LinearSVC in the primal (trust-region Newton), one fit per C and
  fold, in threads.
`auto` is the torch solver, which measured faster overall at equal accuracy (benchmarks/README.md):
in kernel form (a layer with more values than training rows) from as fast on VGG16 pool1, where
reading the layer dominates, to 8.8x faster on its 4096-wide layers; with 100 classes and 10,000
training rows of 2048 values liblinear had not finished after 5 minutes where the torch probe takes
65 s. liblinear was faster only on narrow layers of a small dataset (up to 2.4x on 15-Scene's
layers of 24 to 1280 values, seconds either way). The layer is streamed and fitted in kernel form
when it has more values than training rows (featx.probes.linear).
"""

from __future__ import annotations

from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC

from featx.data.splits import Split
from featx.options import Solver
from featx.probes import Probe, ProbeOptions, ProbeResult, register
from featx.probes.linear import (
    Pick,
    as_fitted,
    fitted_scaler,
    liblinear_bytes,
    liblinear_solver,
    train_linear,
)
from featx.probes.solvers import fit_squared_hinge, working_bytes
from featx.probes.stream import LayerStream

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def pick_solver(options: ProbeOptions) -> Pick:
    """The solver asked for, or what `auto` stands for (see the module docstring)."""
    if options.solver == Solver.LIBLINEAR:
        return "liblinear", liblinear_solver(options.seed), liblinear_bytes
    return "torch", fit_squared_hinge, working_bytes


def train_layer(stream: LayerStream, split: Split, options: ProbeOptions,
                ) -> tuple[ProbeResult, Pipeline]:
    """Train and test a linear SVM on one layer; returns the result and the fitted model, which
    applies to the layer's raw values."""
    result, weights, intercept = train_linear(stream, split, options, probe="svm", grid=C_GRID,
                                              pick=pick_solver(options))
    clf = as_fitted(LinearSVC(C=result.C), stream, weights, intercept=intercept)
    return result, Pipeline([("scale", fitted_scaler(stream)), ("svm", clf)])




register(Probe("svm", "Linear SVM", "LinearSVC's objective (squared hinge, one-vs-rest)", train_layer))
