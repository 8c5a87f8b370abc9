"""What the layers share: linear CKA (centred kernel alignment) between every pair of cached
layers, of one model or of several on the same images.

CKA(X, Y) = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) for column-centred features. It is 1
for the same representation, and stays the same under an orthogonal transform or a uniform scaling
of either side. Narrow layers use that feature form (p x q products); a layer wider than the
number of images uses its centred Gram matrix Kc = Xc Xc^T (n x n), since ||Xc^T Yc||_F^2 =
<Kc, Lc>: the cost then follows the number of images, not the width. The study computes every
layer's Gram matrix streamed from the cache (featx.probes.linear.train_gram), so no layer is held.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.errors import FeatxError


@dataclass
class Similarity:
    """Linear CKA between named layers (model/layer), on the images all of them hold."""

    names: list[str]
    matrix: np.ndarray
    n_images: int

    def write_csv(self, path: Path) -> Path:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", *self.names])
            for name, row in zip(self.names, self.matrix):
                writer.writerow([name, *(f"{v:.4f}" for v in row)])
        return path


def centred(features: np.ndarray) -> np.ndarray:
    x = features.astype(np.float64)
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two feature matrices with the same rows."""
    return _cka(_Side(x), _Side(y))


class _Side:
    """One layer, centred, with its self-similarity norm, in feature or Gram form."""

    def __init__(self, features: np.ndarray | None = None, gram: np.ndarray | None = None) -> None:
        if gram is not None:  # K = X X^T of the uncentred rows: centred on both sides, H K H
            k = np.asarray(gram, dtype=np.float64)
            mean = k.mean(axis=0)
            self.gram, self.value = True, k - mean[None, :] - mean[:, None] + mean.mean()
            self.norm = float(np.linalg.norm(self.value))
            return
        x = centred(features)
        self.gram = x.shape[1] > x.shape[0]
        self.value = x @ x.T if self.gram else x
        self.norm = float(np.linalg.norm(self.value)) if self.gram else float(np.linalg.norm(x.T @ x))


def _cka(a: _Side, b: _Side) -> float:
    if a.norm == 0 or b.norm == 0:
        return float("nan")  # a constant layer has no structure to compare
    if a.gram or b.gram:
        ka = a.value if a.gram else a.value @ a.value.T
        kb = b.value if b.gram else b.value @ b.value.T
        cross = float(np.sum(ka * kb))
    else:
        cross = float(np.linalg.norm(a.value.T @ b.value) ** 2)
    return cross / (a.norm * b.norm)


def similarity(layers: dict[str, np.ndarray], grams: bool = False) -> Similarity:
    """CKA between every pair of `layers` ({name: (n, dim) features on the same rows}, or with
    `grams` {name: (n, n) Gram matrix X X^T of those rows, as a streamed layer gives it})."""
    if len(layers) < 2:
        raise FeatxError("layer similarity needs at least two layers; name more layers or models")
    sides = {name: _Side(gram=value) if grams else _Side(value) for name, value in layers.items()}
    names = list(layers)
    matrix = np.eye(len(names))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            matrix[i, j] = matrix[j, i] = _cka(sides[names[i]], sides[names[j]])
    return Similarity(names, matrix, len(next(iter(layers.values()))))


def heatmap(result: Similarity, path: Path, title: str) -> Path:
    """A PNG (or SVG, by suffix) of the CKA matrix with its values written in."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with rc_context({"text.parse_math": False}):  # names drawn as they are, never as mathematics
        size = 1.6 + 0.55 * len(result.names)
        fig = Figure(figsize=(size + 1.5, size), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(result.matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(result.names)), result.names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(result.names)), result.names, fontsize=8)
        for i, row in enumerate(result.matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
        fig.colorbar(image, ax=ax, label="linear CKA")
        ax.set_title(title, fontsize=10)
        fig.savefig(path, dpi=120)
        return path
