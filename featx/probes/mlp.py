"""A small dense head per layer, the frozen network's classic transfer-learning recipe: one hidden
layer (ReLU, dropout) trained with AdamW in mini-batches on the layer's scaled rows, on the
stream's device (GPU or CPU).

Early stopping: a seeded, stratified part of each class's training rows (`held_out`) is kept
out of training; after each epoch the head is scored on it, and training stops once `patience`
epochs passed without a better validation score (accuracy first, then cross-entropy); the best
epoch's weights are restored (or, with `refit`, a new head is trained on every training row for
that many epochs). The result counts as converged when training stopped that way, before the
epoch limit. Initialisation, shuffling, dropout and the held-out rows all come from
`seed` (torch generators, the global random state is left alone): on the CPU the same seed gives
the same head, with the same number of threads (another count sums the matrix products in
another order, and the runs part after a few epochs).

Memory: the training rows are held, with the head's weights, gradients, AdamW's two moments and
the best epoch's copy, within the budget (`--memory`); the test rows are scored block by block.
Under torchrun every rank trains the same head on all training rows, rank 0's weights are then
given to every rank (on GPUs two ranks' runs need not agree to the last bit), and the ranks
score a part of the test rows each.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from featx.data.splits import Split
from featx.errors import FeatxError
from featx.extract.ranks import Ranks
from featx.options import describe_bytes
from featx.probes import Probe, ProbeOptions, ProbeParam, ProbeResult, balanced_accuracy, register
from featx.probes.linear import fitted_scaler
from featx.probes.stream import LayerStream

log = logging.getLogger(__name__)

HIDDEN, DROPOUT, EPOCHS, PATIENCE = 1024, 0.5, 200, 20
LR, WEIGHT_DECAY, BATCH, HELD_OUT = 3e-3, 1e-4, 128, 0.15
REFIT = 0
PARAMS = (
    ProbeParam("hidden", HIDDEN, "units of the hidden layer", 1, 65536, whole=True),
    ProbeParam("dropout", DROPOUT, "share of the hidden units dropped at each training step", 0.0, 0.95),
    ProbeParam("epochs", EPOCHS, "most passes over the training rows", 1, 100000, whole=True),
    ProbeParam("patience", PATIENCE, "epochs without a better validation score before training stops",
               1, 10000, whole=True),
    ProbeParam("lr", LR, "AdamW learning rate", 1e-6, 1.0),
    ProbeParam("weight_decay", WEIGHT_DECAY, "AdamW weight decay", 0.0, 1.0),
    ProbeParam("batch", BATCH, "training rows per step", 1, 65536, whole=True),
    ProbeParam("held_out", HELD_OUT, "share of each class's training rows held out for early stopping",
               0.05, 0.5),
    ProbeParam("refit", REFIT, "1: once early stopping found the best epoch count, train a new head on all "
               "training rows for that many epochs; 0: keep the best epoch's head", 0, 1, whole=True),
)
SCORE_ROWS = 1024  # validation rows scored at a time


@dataclass(frozen=True)
class HeadSettings:
    """The head's shape and how it is trained (the probe's parameters, `PARAMS`)."""

    hidden: int = HIDDEN
    dropout: float = DROPOUT
    epochs: int = EPOCHS
    patience: int = PATIENCE
    lr: float = LR
    weight_decay: float = WEIGHT_DECAY
    batch: int = BATCH
    held_out: float = HELD_OUT
    refit: int = REFIT

    @classmethod
    def from_params(cls, params: Mapping[str, float]) -> HeadSettings:
        """The defaults of `PARAMS`, overridden by the values given."""
        values = {p.name: (int if p.whole else float)(params.get(p.name, p.default)) for p in PARAMS}
        return cls(**values)

    def parameter_count(self, dim: int, n_classes: int) -> int:
        return (dim + 1) * self.hidden + (self.hidden + 1) * n_classes

    def training_bytes(self, dim: int, n_classes: int) -> int:
        """What training holds beside the rows: weights, gradients, AdamW's two moments and the
        best epoch's copy (5 float32 copies), and the activations of one step or one block of
        validation rows."""
        step = 4 * max(self.batch, SCORE_ROWS) * (dim + 3 * self.hidden + 3 * n_classes)
        return 20 * self.parameter_count(dim, n_classes) + step


Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # w1, b1, w2, b2 (torch layout)


@dataclass
class HeadFit:
    """A trained head: the best epoch's weights (with refit: the new head's) and how training went."""

    weights: Weights
    best_epoch: int  # 1-based
    epochs_run: int
    stopped_early: bool
    validation_accuracy: float  # of the best epoch
    validation_loss: float
    history: list[tuple[float, float]]  # (validation accuracy, loss) after each epoch


def held_out_rows(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A boolean mask of the training rows kept out for early stopping: round(share x count) of
    each class with at least two rows (at least one, never all), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < 2:
            continue
        take = min(len(rows) - 1, max(1, round(share * len(rows))))
        mask[rng.permutation(rows)[:take]] = True
    if not mask.any():
        raise FeatxError("the mlp probe holds training images out for early stopping: it needs a class "
                         "with at least 2 training images")
    return mask


def head_scores(x: torch.Tensor, weights: Weights) -> torch.Tensor:
    """Class scores (logits) of the rows `x`, without dropout."""
    w1, b1, w2, b2 = weights
    return torch.relu(x @ w1.T + b1) @ w2.T + b2


def _initial_weights(dim: int, hidden: int, n_classes: int, generator: torch.Generator) -> list[torch.Tensor]:
    """torch.nn.Linear's initialisation (uniform within 1/sqrt(fan_in)), drawn from `generator`."""
    weights = []
    for fan_in, fan_out in ((dim, hidden), (hidden, n_classes)):
        bound = 1 / math.sqrt(fan_in)
        weights.append(torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=generator))
        weights.append(torch.empty(fan_out).uniform_(-bound, bound, generator=generator))
    return weights


def _validation_score(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, weights: Weights,
                      ) -> tuple[float, float]:
    right, loss = 0, 0.0
    for start in range(0, len(rows), SCORE_ROWS):
        part = rows[start:start + SCORE_ROWS]
        scores = head_scores(x[part], weights)
        right += int((scores.argmax(1) == y[part]).sum())
        loss += float(torch.nn.functional.cross_entropy(scores, y[part], reduction="sum"))
    return right / len(rows), loss / len(rows)


def fit_head(x: torch.Tensor, y: torch.Tensor, validation: np.ndarray, *, n_classes: int,
             settings: HeadSettings, seed: int) -> HeadFit:
    """Train the head on the rows of `x` not in `validation` (a boolean mask), stopping early on
    those in it; returns the best epoch's weights (on x's device). Without validation rows it
    trains `settings.epochs` epochs and returns the last one's weights."""
    device = x.device
    generator = torch.Generator().manual_seed(seed)  # initialisation and shuffling, on the CPU
    dropping = torch.Generator(device=device).manual_seed(seed + 1)  # dropout masks, where x is
    params = [p.to(device).requires_grad_() for p in
              _initial_weights(x.shape[1], settings.hidden, n_classes, generator)]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    fit_rows = torch.as_tensor(np.flatnonzero(~validation))
    held = torch.as_tensor(np.flatnonzero(validation), device=device)
    keep = 1.0 - settings.dropout
    best_key, best, best_epoch, history, since = (-1.0, -math.inf), None, 0, [], 0
    for epoch in range(1, settings.epochs + 1):
        order = fit_rows[torch.randperm(len(fit_rows), generator=generator)].to(device)
        for start in range(0, len(order), settings.batch):
            rows = order[start:start + settings.batch]
            hidden = torch.relu(x[rows] @ params[0].T + params[1])
            if settings.dropout:
                mask = torch.rand(hidden.shape, generator=dropping, device=device) < keep
                hidden = hidden * mask / keep
            loss = torch.nn.functional.cross_entropy(hidden @ params[2].T + params[3], y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not len(held):
            continue
        with torch.no_grad():
            accuracy, val_loss = _validation_score(x, y, held, tuple(params))
        history.append((accuracy, val_loss))
        if (accuracy, -val_loss) > best_key:
            best_key, best_epoch, since = (accuracy, -val_loss), epoch, 0
            best = tuple(p.detach().clone() for p in params)
        else:
            since += 1
            if since >= settings.patience:
                break
    if not len(held):
        return HeadFit(tuple(p.detach() for p in params), best_epoch=settings.epochs,
                       epochs_run=settings.epochs, stopped_early=False, validation_accuracy=math.nan,
                       validation_loss=math.nan, history=[])
    return HeadFit(best, best_epoch=best_epoch, epochs_run=len(history),
                   stopped_early=since >= settings.patience, validation_accuracy=best_key[0],
                   validation_loss=-best_key[1], history=history)


def train_head(x: torch.Tensor, y: torch.Tensor, validation: np.ndarray, *, n_classes: int,
               settings: HeadSettings, seed: int) -> HeadFit:
    """`fit_head` with early stopping on the `validation` rows; with `settings.refit`, then a new
    head (the same seed) on every row for the best epoch count, whose weights it returns with the
    early-stopping run's story."""
    fit = fit_head(x, y, validation, n_classes=n_classes, settings=settings, seed=seed)
    if not settings.refit:
        return fit
    fit.weights = ()  # freed before the new head is trained
    whole = fit_head(x, y, np.zeros(len(validation), dtype=bool), n_classes=n_classes,
                     settings=replace(settings, epochs=fit.best_epoch), seed=seed)
    return replace(fit, weights=whole.weights)


class MLPHead(ClassifierMixin, BaseEstimator):
    """The trained head as a scikit-learn classifier (on rows scaled as the probe saw them):
    `coefs_` and `intercepts_` per layer as scikit-learn's MLPClassifier keeps them, `predict`,
    `predict_proba`; `fit` trains it as the probe does (on the CPU)."""

    def __init__(self, hidden: int = HIDDEN, dropout: float = DROPOUT, epochs: int = EPOCHS,
                 patience: int = PATIENCE, lr: float = LR, weight_decay: float = WEIGHT_DECAY,
                 batch: int = BATCH, held_out: float = HELD_OUT, refit: int = REFIT,
                 random_state: int = 0) -> None:
        self.hidden, self.dropout, self.epochs, self.patience = hidden, dropout, epochs, patience
        self.lr, self.weight_decay, self.batch, self.held_out = lr, weight_decay, batch, held_out
        self.refit = refit
        self.random_state = random_state

    def settings(self) -> HeadSettings:
        return HeadSettings(hidden=int(self.hidden), dropout=float(self.dropout), epochs=int(self.epochs),
                            patience=int(self.patience), lr=float(self.lr),
                            weight_decay=float(self.weight_decay), batch=int(self.batch),
                            held_out=float(self.held_out), refit=int(self.refit))

    def fit(self, X, y) -> MLPHead:
        self.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
        x = torch.as_tensor(np.asarray(X, dtype=np.float32))
        validation = held_out_rows(codes, self.held_out, self.random_state)
        fit = train_head(x, torch.as_tensor(codes), validation, n_classes=len(self.classes_),
                         settings=self.settings(), seed=self.random_state)
        return self.set_fitted(fit)

    def set_fitted(self, fit: HeadFit, classes: np.ndarray | None = None) -> MLPHead:
        """Take the weights and the story of a trained head (classes: 0..n-1 unless given)."""
        w1, b1, w2, b2 = (w.detach().cpu().numpy().astype(np.float32) for w in fit.weights)
        self.coefs_, self.intercepts_ = [w1.T, w2.T], [b1, b2]
        if classes is not None:
            self.classes_ = classes
        elif not hasattr(self, "classes_"):
            self.classes_ = np.arange(len(b2))
        self.n_features_in_ = w1.shape[1]
        self.best_epoch_, self.n_epochs_ = fit.best_epoch, fit.epochs_run
        self.stopped_early_, self.validation_accuracy_ = fit.stopped_early, fit.validation_accuracy
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "coefs_")
        x = torch.as_tensor(np.asarray(X, dtype=np.float32))
        weights = (torch.as_tensor(self.coefs_[0].T), torch.as_tensor(self.intercepts_[0]),
                   torch.as_tensor(self.coefs_[1].T), torch.as_tensor(self.intercepts_[1]))
        with torch.no_grad():
            return head_scores(x, weights).numpy()

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(torch.as_tensor(self.decision_function(X)), 1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(1)]


def _from_lead(fit: HeadFit, ranks: Ranks) -> HeadFit:
    """Rank 0's head and its story on every rank (all ranks call it); alone, `fit` itself."""
    if not ranks.several:
        return fit
    device = fit.weights[0].device
    story = torch.tensor([fit.best_epoch, fit.epochs_run, int(fit.stopped_early)], device=device)
    best_epoch, epochs_run, stopped_early = ranks.from_lead(story).tolist()
    scores = ranks.from_lead(torch.tensor([fit.validation_accuracy, fit.validation_loss], device=device))
    return replace(fit, weights=tuple(ranks.from_lead(w) for w in fit.weights), best_epoch=best_epoch,
                   epochs_run=epochs_run, stopped_early=bool(stopped_early),
                   validation_accuracy=float(scores[0]), validation_loss=float(scores[1]))


def memory_needed(stream: LayerStream, n_train: int, settings: HeadSettings, *, n_classes: int) -> int:
    """Bytes the training holds: the training rows and `HeadSettings.training_bytes`."""
    return n_train * stream.row_bytes + settings.training_bytes(stream.dim, n_classes)


def train_layer(stream: LayerStream, split: Split, options: ProbeOptions) -> tuple[ProbeResult, Pipeline]:
    """Train the head on one layer's training rows, score the test rows; returns the result and
    the fitted model (the stream's scaling, then the head: it applies to the layer's raw values)."""
    started = time.perf_counter()
    settings = HeadSettings.from_params(options.params)
    stream.memo.clear()  # what a linear probe kept for the next one: the head needs the room
    budget = stream.budget_left(options.memory)
    stream.fit_scaling(split.train, budget)
    n_classes = len(stream.store.classes)
    need = memory_needed(stream, len(split.train), settings, n_classes=n_classes)
    if need > budget // 2:  # the other half: blocks of rows in flight
        layer = len(stream.index) * stream.row_bytes
        enough = 2 * need + (layer if layer <= need else 0)  # that budget holds the layer too
        raise FeatxError(f"the mlp probe holds the {len(split.train)} training rows of layer {stream.name} "
                         f"({stream.dim} values a row) and a head of {settings.hidden} hidden units: "
                         f"{describe_bytes(need)}, more than half the memory budget left; --memory "
                         f"{describe_bytes(enough)} or more would work")
    labels = stream.labels[split.train]
    validation = held_out_rows(labels, settings.held_out, options.seed)
    x = stream.gather(split.train, budget // 2, "the training rows")
    y = torch.as_tensor(labels, device=stream.device)
    fit = train_head(x, y, validation, n_classes=n_classes, settings=settings, seed=options.seed)
    del x
    ranks = stream.ranks
    fit = _from_lead(fit, ranks)
    log.info("mlp on %s: best epoch %d of %d (validation accuracy %.4f)%s", stream.name, fit.best_epoch,
             fit.epochs_run, fit.validation_accuracy, "" if fit.stopped_early else ", at the epoch limit")
    predicted = [np.zeros(0, dtype=np.int64)]
    rows = max(1, min(stream.block_rows(budget // 2), (budget // 8) // (4 * (settings.hidden + n_classes))))
    with torch.no_grad():
        for _, block in stream.blocks(rows, ranks.share(split.test)):
            predicted.append(head_scores(block, fit.weights).argmax(1).cpu().numpy())
    y_pred = ranks.joined(np.concatenate(predicted))
    y_true = stream.labels[split.test]
    result = ProbeResult(
        layer=stream.name, dim=stream.dim, accuracy=float((y_pred == y_true).mean()),
        balanced_accuracy=balanced_accuracy(y_true, y_pred), C=None, scaling=stream.scaling,
        train_seconds=time.perf_counter() - started, kernel_form=False, n_train=len(split.train),
        n_test=len(split.test), converged=fit.stopped_early, probe="mlp", solver="adamw",
        y_true=y_true.astype(np.int32), y_pred=y_pred.astype(np.int32))
    head = MLPHead(**asdict(settings), random_state=options.seed)
    head.set_fitted(fit, classes=np.arange(n_classes))
    return result, Pipeline([("scale", fitted_scaler(stream)), ("mlp", head)])


register(Probe(
    "mlp", "MLP head", "one hidden layer (ReLU, dropout) trained with AdamW, early stopping on held-out "
    "training images", train_layer, chooses_C=False, params=PARAMS,
    unconverged="its training reached the epoch limit before early stopping ended it"))
