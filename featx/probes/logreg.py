"""Multinomial logistic regression per layer: scikit-learn's LogisticRegression objective (L2,
softmax over the classes), C by cross-validation over C_GRID, solved by the batched torch solver
(featx.probes.solvers) on the GPU or the CPU, streaming the layer as the SVM does
(featx.probes.linear). It has no second solver: scikit-learn's lbfgs minimises the same objective
but stops at a looser tolerance of its own, so its classifier would not be the same; `--solver`
concerns the SVM only. The grid reaches higher than the SVM's: on unit-length rows the logistic
loss needs large weights before it separates classes."""

from __future__ import annotations

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from featx.data.splits import Split
from featx.probes import Probe, ProbeOptions, ProbeResult, register
from featx.probes.linear import as_fitted, fitted_scaler, train_linear
from featx.probes.solvers import fit_logistic, working_bytes
from featx.probes.stream import LayerStream

C_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


def train_layer(stream: LayerStream, split: Split, options: ProbeOptions,
                ) -> tuple[ProbeResult, Pipeline]:
    """Train and test logistic regression on one layer; returns the result and the fitted model
    (it applies to the layer's raw values and gives class probabilities)."""
    result, weights, intercept = train_linear(stream, split, options, probe="logreg", grid=C_GRID,
                                              pick=lambda shape, cap: ("torch", fit_logistic, working_bytes))
    clf = as_fitted(LogisticRegression(C=result.C), stream, weights, intercept=intercept)
    return result, Pipeline([("scale", fitted_scaler(stream)), ("logreg", clf)])


register(Probe("logreg", "Logistic regression", "multinomial logistic regression (L2)", train_layer))
