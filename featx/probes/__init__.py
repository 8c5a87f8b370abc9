"""Probes: what is trained on a cached layer and scored on the test images. Each probe is one
module whose `train_layer(stream, split, options)` streams the layer (featx.probes.stream) and
returns a `ProbeResult` and the fitted scikit-learn model (None where a probe has none to save).

    svm     linear SVM (LinearSVC's objective), C by cross-validation
    logreg  multinomial logistic regression, L2, C by cross-validation
    knn     k nearest neighbours by cosine similarity, k=20, temperature-weighted votes
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from featx.errors import FeatxError, OptionError

PROBES = ("svm", "logreg", "knn")
SOLVERS = ("auto", "torch", "liblinear")


@dataclass
class ProbeResult:
    """What one probe scored on one layer and one split, with which settings, in how long."""

    layer: str
    dim: int
    accuracy: float
    C: float | None  # None: a probe without C (knn)
    scaling: str
    train_seconds: float
    kernel_form: bool
    n_train: int
    n_test: int
    converged: bool
    probe: str = "svm"
    balanced_accuracy: float = float("nan")
    solver: str = ""  # the solver that fitted it (svm: torch or liblinear)
    cv_scores: dict[str, float] = field(default_factory=dict)
    test_paths: list[str] = field(default_factory=list)
    y_true: list[int] = field(default_factory=list)
    y_pred: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ProbeOptions:
    """What every probe is given besides the layer and the split."""

    C: float | str = "auto"
    seed: int = 0
    solver: str = "auto"
    memory: int = 2 << 30

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise OptionError("solver", f"must be one of {', '.join(SOLVERS)}, not {self.solver!r}")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in `y_true`."""
    classes = np.unique(y_true)
    if not len(classes):
        return float("nan")
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes]))


def parse_probes(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`svm,logreg` or a list of names -> the probes in the order given, each known."""
    names = [n.strip() for item in ([text] if isinstance(text, str) else text) for n in item.split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in PROBES]
    if unknown or not names:
        raise OptionError("probe", f"must be among {', '.join(PROBES)} (comma-separated), not "
                          f"{', '.join(unknown) or repr(text)}")
    return tuple(names)


def get_probe(name: str) -> Callable:
    """The `train_layer` function of a registered probe."""
    if name == "svm":
        from featx.probes.svm import train_layer
    elif name == "logreg":
        from featx.probes.logreg import train_layer
    elif name == "knn":
        from featx.probes.knn import train_layer
    else:
        raise FeatxError(f"unknown probe {name!r}; known probes: {', '.join(PROBES)}")
    return train_layer
