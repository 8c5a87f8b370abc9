"""Linear SVM per layer: LinearSVC's own objective (L2-regularised squared hinge, one-vs-rest,
the bias regularised as a feature of constant 1), C by cross-validation over C_GRID.

Two solvers give the same classifier (tests and benchmarks/svm.py compare them):
- `torch` (featx.probes.solvers): every class, every C and every fold as one batched truncated
  Newton problem, on the GPU or the CPU;
- `liblinear`: scikit-learn's LinearSVC in the primal (trust-region Newton), one fit per C and
  fold, in threads.
`auto` takes the torch solver on a GPU and on a CPU, where it measured faster at equal accuracy
(benchmarks/README.md). The layer is streamed and fitted in kernel form when it has more values
than training rows (featx.probes.linear).
"""

from __future__ import annotations

from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC

from featx.data import Split
from featx.probes import ProbeOptions, ProbeResult
from featx.probes.linear import as_fitted, fitted_scaler, liblinear_bytes, liblinear_solver, train_linear
from featx.probes.solvers import fit_squared_hinge, working_bytes
from featx.probes.stream import SCALINGS, LayerStream

__all__ = ["C_GRID", "SCALINGS", "train_layer"]

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def solver_for(options: ProbeOptions) -> str:
    """The solver `auto` stands for (see the module docstring)."""
    return "torch" if options.solver == "auto" else options.solver


def train_layer(stream: LayerStream, split: Split, options: ProbeOptions,
                ) -> tuple[ProbeResult, Pipeline]:
    """Train and test a linear SVM on one layer; returns the result and the fitted model, which
    applies to the layer's raw values."""
    if solver_for(options) == "liblinear":
        solve, memory = liblinear_solver(options.seed), liblinear_bytes
    else:
        solve, memory = fit_squared_hinge, working_bytes
    result, weights, intercept = train_linear(stream, split, options, "svm", C_GRID, solve, memory)
    clf = as_fitted(LinearSVC(C=result.C), stream, weights, intercept)
    return result, Pipeline([("scale", fitted_scaler(stream)), ("svm", clf)])


