"""Linear SVM per layer on cached features: split, scaling, C, timing.

When a layer has more dimensions than training images (pool4: 100352 vs 1500), the SVM is
trained in kernel form: the linear Gram matrix of the training images is computed once and
factored, K = U diag(s) U^T, and every image is mapped to the n-dimensional coordinates
z = x X_train^T U diag(s)^-1/2. A linear SVM on z is the same optimisation problem as on x (the
weight vector lies in the span of the training images), so it gives the same classifier while
each fit, and each C tried in cross-validation, costs n x n instead of n x d.

On l2-scaled rows (the default) every fit solves the primal problem (liblinear's trust-region
Newton method): it takes a few Newton steps whatever C is, whereas dual coordinate descent, which
LinearSVC picks when there are fewer samples than features (every cross-validation fold), slows
down as C grows. On 15-Scene with random weights, the search for C needs C=100: a fit on VGG16
pool4 at C=100 took 7 s in the primal against 39 s in the dual, and the whole SVM stage on
EfficientNet-Lite0 pool 12 s against 59 s; with ImageNet features the two cost about the same.
On standardized or unscaled rows the primal solver measured far slower than the dual at middle
values of C (VGG16 relu7, EfficientNet-Lite0 pool), so there the choice stays LinearSVC's own.
The cross-validation fits run in threads (liblinear releases the GIL), one per core.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from featx.data import Split
from featx.errors import FeatxError, OptionError
from featx.probes import ProbeResult
from featx.store import LayerFeatures

SCALINGS = ("l2", "standardize", "none")
DEFAULT_SCALING = "l2"
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
CV_FOLDS = 3


def scale(features: np.ndarray, train: np.ndarray, scaling: str):
    """Scale features in place (chunked) and return the fitted scaling step for the saved model."""
    if scaling not in SCALINGS:
        raise OptionError("scaling", f"must be one of {', '.join(SCALINGS)}, not {scaling!r}")
    step = 1 << 12
    if scaling == "l2":
        for s in range(0, len(features), step):
            block = features[s:s + step]
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        return Normalizer().fit(features[:1])
    if scaling == "standardize":
        scaler = StandardScaler().fit(features[train])
        for s in range(0, len(features), step):
            features[s:s + step] -= scaler.mean_.astype(np.float32)
            features[s:s + step] /= scaler.scale_.astype(np.float32)
        return scaler
    return FunctionTransformer().fit(features[:1])


class KernelProjection:
    """Map features to coordinates in the span of the training rows (see the module docstring)."""

    def __init__(self, device: str | None = None, tolerance: float = 1e-10) -> None:
        self.device = device
        self.tolerance = tolerance

    def fit_transform(self, features: np.ndarray, train: np.ndarray) -> np.ndarray:
        """Coordinates of every row of `features`, computed from the Gram block against train."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.x_train_ = np.ascontiguousarray(features[train])
        x_train = torch.from_numpy(self.x_train_).to(device)  # shares the array's memory on a CPU
        gram = torch.zeros((len(features), len(train)), dtype=torch.float64)
        step = 2048
        for s in range(0, len(features), step):
            block = torch.from_numpy(np.ascontiguousarray(features[s:s + step])).to(device)
            gram[s:s + step] = (block @ x_train.T).double().cpu()
        eigval, eigvec = torch.linalg.eigh(gram[torch.from_numpy(train)])
        keep = eigval > max(float(eigval.max()) * self.tolerance, 0.0)
        # U diag(s)^-1/2; a layer that is zero on every training image (the zero-initialised head
        # of a random vit) keeps one zero coordinate, so the classifier learns only its bias
        self.basis_ = (eigvec[:, keep] / eigval[keep].sqrt()).numpy() if keep.any() else \
            np.zeros((len(train), 1))
        return (gram.numpy() @ self.basis_).astype(np.float32)

    def to_feature_space(self, coef: np.ndarray) -> np.ndarray:
        """Weights on the coordinates -> the equivalent weights on the original features
        (in float64, a block of feature columns at a time)."""
        dual_coef = coef @ self.basis_.T
        weights = np.empty((len(coef), self.x_train_.shape[1]), dtype=np.float32)
        step = 8192
        for s in range(0, weights.shape[1], step):
            weights[:, s:s + step] = dual_coef @ self.x_train_[:, s:s + step].astype(np.float64)
        return weights


def dual_for(scaling: str) -> bool | str:
    """LinearSVC's `dual` setting for features scaled this way (see the module docstring)."""
    return False if scaling == "l2" else "auto"


def _svc(C: float, seed: int, max_iter: int, dual: bool | str) -> LinearSVC:
    return LinearSVC(C=C, dual=dual, max_iter=max_iter, random_state=seed)


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int,
         dual: bool | str = "auto") -> tuple[LinearSVC, bool]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf = _svc(C, seed, 5000, dual).fit(x, y)
    return clf, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _fold_accuracy(x: np.ndarray, y: np.ndarray, fit_rows: np.ndarray, held_out: np.ndarray,
                   C: float, seed: int, dual: bool | str) -> float:
    # CV only ranks the values of C: sklearn's default iteration budget is enough for that
    clf = _svc(C, seed, 1000, dual).fit(x[fit_rows], y[fit_rows])
    return float((clf.predict(x[held_out]) == y[held_out]).mean())


def choose_C(x: np.ndarray, y: np.ndarray, seed: int, jobs: int = -1,
             dual: bool | str = "auto") -> tuple[float, dict[str, float]]:
    """The C of C_GRID with the best mean accuracy over stratified folds of the training rows;
    the fits run in `jobs` threads (-1: one per core) with LinearSVC's `dual` setting."""
    folds = min(CV_FOLDS, int(np.bincount(y).min()))
    if folds < 2:
        raise FeatxError("choosing C by cross-validation needs at least 2 training images per class; "
                         "give C a value")
    parts = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    grid = sorted(C_GRID, reverse=True)  # the slowest fits first, so the threads finish together
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        accuracy = Parallel(n_jobs=jobs, prefer="threads")(
            delayed(_fold_accuracy)(x, y, a, b, C, seed, dual) for C in grid for a, b in parts)
    mean = {C: float(np.mean(accuracy[k * folds:(k + 1) * folds])) for k, C in enumerate(grid)}
    best = max(C_GRID, key=lambda C: (mean[C], -C))
    return best, {f"{C:g}": mean[C] for C in C_GRID}


def train_layer(data: LayerFeatures, split: Split, C: float | str = "auto",
                scaling: str = DEFAULT_SCALING, seed: int = 0, paths: list[str] | None = None,
                ) -> tuple[ProbeResult, Pipeline]:
    """Train and test a linear SVM on one layer; returns the result and the fitted model, which
    applies to raw features of that layer."""
    started = time.perf_counter()
    features = data.features if data.features.flags.writeable else data.features.copy()
    y = data.labels
    scaler = scale(features, split.train, scaling)
    kernel_form = len(split.train) < features.shape[1]
    projection = KernelProjection() if kernel_form else None
    x = projection.fit_transform(features, split.train) if projection else features
    x_train, y_train = x[split.train], y[split.train]
    dual = dual_for(scaling)
    if C == "auto":
        C_value, cv_scores = choose_C(x_train, y_train, seed, dual=dual)
    else:
        C_value, cv_scores = float(C), {}
    clf, converged = _fit(x_train, y_train, C_value, seed, dual)
    y_pred = clf.predict(x[split.test])
    seconds = time.perf_counter() - started
    if projection:
        clf.coef_ = projection.to_feature_space(clf.coef_)
        clf.n_features_in_ = features.shape[1]
    model = Pipeline([("scale", scaler), ("svm", clf)])
    y_true = y[split.test]
    result = ProbeResult(
        layer=data.name, dim=data.dim, accuracy=float((y_pred == y_true).mean()), C=C_value,
        scaling=scaling, train_seconds=seconds, kernel_form=kernel_form, n_train=len(split.train),
        n_test=len(split.test), converged=converged, cv_scores=cv_scores,
        test_paths=[paths[i] for i in split.test] if paths else [],
        y_true=y_true.tolist(), y_pred=y_pred.tolist())
    return result, model
