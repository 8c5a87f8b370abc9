"""Probes: what is trained on a cached layer and scored on the test images. Each probe is one
module with a `train` function returning a `ProbeResult` and the fitted scikit-learn model.

Today's registry holds the linear SVM (`svm`); logistic regression and k-NN join it here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from featx.errors import FeatxError


@dataclass
class ProbeResult:
    """What one probe scored on one layer and one split, with which settings, in how long."""

    layer: str
    dim: int
    accuracy: float
    C: float
    scaling: str
    train_seconds: float
    kernel_form: bool
    n_train: int
    n_test: int
    converged: bool
    probe: str = "svm"
    cv_scores: dict[str, float] = field(default_factory=dict)
    test_paths: list[str] = field(default_factory=list)
    y_true: list[int] = field(default_factory=list)
    y_pred: list[int] = field(default_factory=list)


def get_probe(name: str) -> Callable:
    """The `train` function of a registered probe."""
    if name == "svm":
        from featx.probes.svm import train_layer

        return train_layer
    raise FeatxError(f"unknown probe {name!r}; known probes: svm")


PROBES = ("svm",)
