"""What the linear probes (svm, logreg) share, streaming over a layer's shards.

Kernel form. When a layer has more values than there are training images (VGG16 pool4: 100352 vs
1500), a linear probe's weight vector lies in the span of the training rows. The training Gram
matrix K = X X^T is accumulated block by block (the training rows held in chunks that fit the
memory budget, the layer streamed once per chunk), factored as K = U diag(s) U^T, and each
training row is replaced by its coordinates z = U diag(s)^1/2 in that span. The L2-regularised
problem on z is the same problem as on x (same margins, same norm), so it gives the same
classifier while each fit, and each C tried, costs n x n instead of n x d. The weights found on z
map back to the layer's own values, W = coef diag(s)^-1/2 U^T X, in one more pass over the
training rows, and the test rows are scored with W block by block: no layer is held whole.

Primal form (no more values than training rows): the training rows are held (within the budget)
and the solver works on them directly.

Under torchrun the passes over the layer are shared out between the ranks (the Gram matrix, the
weights, the test rows), and the kernel form is factored once, by rank 0. The solve itself runs
whole on every rank while the training rows fit one rank's budget: it needs no communication, and
a split solve costs an all-reduce per conjugate-gradient step (on the CPU with gloo that made it
slower in every case tried). Training rows (primal
form) beyond one rank's budget are split: each rank holds its part and the torch solver sums
gradients, Hessian products and losses over the ranks, so the ranks' budgets add up.

C is chosen by stratified cross-validation on the training rows: the torch solver fits every C of
the grid on every fold as one batched problem, then the chosen C on all training rows. Where the
best C is at an end of the grid, the search goes on a decade at a time past it (at most two), and
a C still at the end is flagged in the reports.

Threads (featx.probes.threads): each stage of a probe (the training rows and their Gram matrix,
the solve, the weights and the test scores) runs on threads sized to its largest operation, at
most the probe's cap; the count before the probe is restored after each stage.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler

from featx.data.splits import Split
from featx.errors import FeatxError
from featx.options import C_RANGE, describe_bytes
from featx.probes import ProbeOptions, ProbeResult, balanced_accuracy
from featx.probes.costs import SolveShape, liblinear_workers, torch_threads
from featx.probes.solvers import LinearFit, Total, decision, whole, working_bytes
from featx.probes.stream import LayerStream
from featx.probes.threads import running_on, thread_cap, threads_for

CV_FOLDS = 3
WIDEN_DECADES = 2  # how far cross-validation looks past an end of its grid where the best C lies
Solver = Callable[..., LinearFit]  # (x, y, masks, *, C, n_classes, total=) as fit_squared_hinge


@dataclass
class Training:
    """The training rows as a solver sees them: the rows themselves, or (kernel form) their
    coordinates in their own span with the basis that maps weights back to the layer. Rows split
    between ranks: x and y are this rank's `part` of them and `total` sums over the ranks."""

    x: torch.Tensor
    y: torch.Tensor
    positions: np.ndarray
    labels: np.ndarray  # of every training row, on every rank
    basis: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # the training rows, when they were held whole
    part: slice = field(default_factory=lambda: slice(None))  # which rows of `positions` x holds
    total: Total = whole

    @property
    def kernel_form(self) -> bool:
        return self.basis is not None


def training_rows(stream: LayerStream, positions: np.ndarray, budget: int, *, splits: bool = False,
                  ) -> Training:
    """The training rows at `positions` of the stream, in primal or kernel form (see above), split
    between the ranks when they do not fit one rank's budget and the solver `splits` (sums over
    ranks); the last one made is kept on the stream, so the probes of one layer and split share it."""
    splits = splits and stream.ranks.several  # one process: the same rows for every solver
    key = (positions.tobytes(), stream.scaling_key(), splits)
    if key not in stream.memo:
        stream.memo.clear()
        stream.memo[key] = _training_rows(stream, positions, budget, splits=splits)
    return stream.memo[key]


def _training_rows(stream: LayerStream, positions: np.ndarray, budget: int, *, splits: bool) -> Training:
    labels = stream.labels[positions]
    ranks = stream.ranks
    y = torch.as_tensor(labels, device=stream.device)
    if stream.dim <= len(positions):
        split = splits and ranks.several and len(positions) * stream.row_bytes > budget // 2
        part = ranks.part(len(positions)) if split else slice(None)
        x = stream.gather(positions[part], budget // 2, "the training rows")
        return Training(x, y[part], positions, labels, part=part, total=ranks.sum if split else whole)
    gram, rows = train_gram(stream, positions, budget)
    if ranks.lead:
        eigval, eigvec = torch.linalg.eigh(gram)
    else:
        eigval, eigvec = gram.new_empty(len(gram)), torch.empty_like(gram)
    eigval, eigvec = ranks.from_lead(eigval), ranks.from_lead(eigvec)  # one basis on every rank
    keep = eigval > max(float(eigval.max()) * 1e-10, 0.0)
    if not keep.any():  # zero on every training image (a random vit's zeroed head): bias only
        basis = torch.zeros((len(positions), 1), dtype=torch.float64, device=gram.device)
        z = basis.clone()
    else:
        root = eigval[keep].sqrt()
        z, basis = eigvec[:, keep] * root, eigvec[:, keep] / root
    return Training(z.float(), y, positions, labels, basis.float(), rows)


def train_gram(stream: LayerStream, positions: np.ndarray, budget: int,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """X X^T of the training rows in float64, and the rows themselves when they fit half the
    budget at once. Otherwise one pass per chunk of training rows: the chunk fills as its rows
    pass, each passing training row is multiplied with the chunk's rows before it, and the pass
    starts at the chunk's first row (the rows before it met this chunk in earlier passes: the
    matrix is symmetric)."""
    n = len(positions)
    gram_bytes = 8 * n * n * 3  # the matrix, its eigenvectors and the solver's share
    left = budget - gram_bytes
    if left < 4 * stream.row_bytes:
        enough = describe_bytes(gram_bytes + 16 * stream.row_bytes)
        raise FeatxError(f"the memory budget is too small for the {n} x {n} training Gram matrix of "
                         f"layer {stream.name}: --memory {enough} or more would work")
    chunk = stream.rows_within(left // 2, "a chunk of training rows")
    if chunk >= n:
        rows = stream.gather(positions, left // 2, "the training rows")
        return (rows @ rows.T).double(), rows
    if stream.ranks.several:
        return _shared_gram(stream, positions, chunk, left=left), None
    gram = torch.zeros((n, n), dtype=torch.float64, device=stream.device)
    block_rows = stream.block_rows(left // 2)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        held = torch.empty((stop - start, stream.dim), dtype=torch.float32, device=stream.device)
        done = start  # ordinal of the next training row to pass
        for here, block in stream.blocks(block_rows, positions[start:]):
            rows = slice(done, done + len(here))
            if done < stop:  # rows of this chunk: held, then multiplied with the chunk so far
                held[done - start:min(stop, rows.stop) - start] = block[:stop - done]
            filled = min(stop, rows.stop) - start
            gram[start:start + filled, rows] = (held[:filled] @ block.T).double()
            done = rows.stop
        del held
    upper = torch.triu(gram)
    return upper + torch.triu(gram, 1).T, None


def _shared_gram(stream: LayerStream, positions: np.ndarray, chunk: int, *, left: int) -> torch.Tensor:
    """train_gram's passes shared out between ranks: every rank holds each chunk of training rows
    and multiplies it with its part of the rows from the chunk on; the parts, summed over the
    ranks, are the upper triangle (each entry is computed by one rank)."""
    n = len(positions)
    gram = torch.zeros((n, n), dtype=torch.float64, device=stream.device)
    block_rows = stream.block_rows(left // 2)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        held = stream.gather(positions[start:stop], left // 2, "a chunk of training rows")
        for here, block in stream.blocks(block_rows, stream.ranks.share(positions[start:])):
            columns = torch.as_tensor(np.searchsorted(positions, here), device=stream.device)
            gram[start:stop, columns] = (held @ block.T).double()
        del held
    gram = stream.ranks.sum(gram)
    upper = torch.triu(gram)
    return upper + torch.triu(gram, 1).T


def cv_masks(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds of the training rows (fit rows, held-out rows) as boolean masks."""
    folds = min(CV_FOLDS, int(np.bincount(y).min()))
    if folds < 2:
        raise FeatxError("choosing C by cross-validation needs at least 2 training images per class; "
                         "give C a value")
    parts = []
    for fit, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y):
        a, b = np.zeros(len(y), bool), np.zeros(len(y), bool)
        a[fit], b[held_out] = True, True
        parts.append((a, b))
    return parts


def choose_C(training: Training, grid: tuple[float, ...], n_classes: int, *, seed: int, solve: Solver,
             at_once: int | None = None) -> tuple[float, dict[str, float]]:
    """The C of `grid` with the best mean held-out accuracy over the folds (ties: the smaller C),
    every C and fold solved as one batched problem (in groups of `at_once` problems when the
    memory budget holds fewer). Folds are drawn from every training row's label; with rows split
    between ranks, each rank fits and scores its part of each fold and the counts are summed."""
    folds = cv_masks(training.labels, seed)
    masks = np.stack([fit for _ in grid for fit, _ in folds])
    held = np.stack([out for _ in grid for _, out in folds])
    Cs = torch.tensor([C for C in grid for _ in folds], dtype=torch.float64)
    step = at_once or len(Cs)
    device, part = training.x.device, training.part
    predicted = np.concatenate([
        decision(solve(training.x, training.y, torch.as_tensor(masks[k:k + step, part], device=device),
                       C=Cs[k:k + step], n_classes=n_classes, total=training.total),
                 training.x).argmax(-1).cpu().numpy()
        for k in range(0, len(Cs), step)])  # (problems, this rank's rows)
    right = (predicted == training.labels[part]) & held[:, part]
    right = training.total(torch.as_tensor(right.sum(1), device=device)).cpu().numpy()
    accuracy = right / held.sum(1)
    mean = {C: float(accuracy[k * len(folds):(k + 1) * len(folds)].mean()) for k, C in enumerate(grid)}
    best = max(grid, key=lambda C: (mean[C], -C))
    return best, {f"{C:g}": mean[C] for C in grid}


def choose_C_widening(training: Training, grid: tuple[float, ...], n_classes: int, *, seed: int,
                      solve: Solver, at_once: int | None = None) -> tuple[float, dict[str, float], str]:
    """choose_C, then, while the best C is at an end of the grid and scores above its neighbour,
    one more decade past that end (at most WIDEN_DECADES, within C_RANGE) on the same folds;
    returns the C, every C's score and the end ("top", "bottom") the C still lies at, or ""."""
    C, scores = choose_C(training, grid, n_classes, seed=seed, solve=solve, at_once=at_once)
    searched = sorted(grid)
    for _ in range(WIDEN_DECADES):
        edge = _edge(C, searched, scores)
        beyond = C * (10.0 if edge == "top" else 0.1)
        if not edge or not C_RANGE[0] <= beyond <= C_RANGE[1]:
            break
        scores.update(choose_C(training, (beyond,), n_classes, seed=seed, solve=solve, at_once=at_once)[1])
        searched = sorted([*searched, beyond])
        C = max(searched, key=lambda c: (scores[f"{c:g}"], -c))
    return C, {f"{c:g}": scores[f"{c:g}"] for c in searched}, _edge(C, searched, scores)


def _edge(C: float, searched: list[float], scores: dict[str, float]) -> str:
    """The end of the searched values where C lies, scoring above the value next to it (a C tied
    with its neighbour says nothing about values beyond), or ""."""
    if len(searched) < 2:
        return ""
    for end, inner, name in ((searched[-1], searched[-2], "top"), (searched[0], searched[1], "bottom")):
        if C == end and scores[f"{end:g}"] > scores[f"{inner:g}"]:
            return name
    return ""


def feature_weights(stream: LayerStream, training: Training, coef: torch.Tensor,
                    *, budget: int) -> torch.Tensor:
    """(classes, values) weights on the layer's own (scaled) values: in kernel form, coef on the
    coordinates times diag(s)^-1/2 U^T times the training rows, summed block by block."""
    if not training.kernel_form:
        return coef
    alpha = coef @ training.basis.T  # (classes, training rows)
    if training.rows is not None:
        return alpha @ training.rows
    weights = torch.zeros((len(coef), stream.dim), dtype=torch.float32, device=stream.device)
    for here, block in stream.blocks(stream.block_rows(budget), stream.ranks.share(training.positions)):
        columns = torch.as_tensor(np.searchsorted(training.positions, here), device=stream.device)
        weights += alpha[:, columns] @ block
    return stream.ranks.sum(weights)


def predict_rows(stream: LayerStream, positions: np.ndarray, weights: torch.Tensor, *,
                 intercept: torch.Tensor,
                 budget: int) -> np.ndarray:
    """The class with the highest score for each row at `positions`, block by block (each rank
    scores its part of the rows)."""
    predicted = [np.zeros(0, dtype=np.int64)]
    for _, block in stream.blocks(stream.block_rows(budget), stream.ranks.share(positions)):
        predicted.append((block @ weights.T + intercept).argmax(1).cpu().numpy())
    return stream.ranks.joined(np.concatenate(predicted))


def as_fitted(estimator, stream: LayerStream, weights: torch.Tensor, *, intercept: torch.Tensor):
    """A scikit-learn linear classifier holding these weights, as if fitted on the layer's scaled
    values (coef_, intercept_, classes_): it predicts with scikit-learn's own code."""
    estimator.coef_ = weights.cpu().numpy().astype(np.float32)
    estimator.intercept_ = intercept.cpu().numpy().astype(np.float64)
    estimator.classes_ = np.arange(len(stream.store.classes))
    estimator.n_features_in_ = stream.dim
    return estimator


def fitted_scaler(stream: LayerStream):
    """The scikit-learn step that applies the stream's scaling to raw rows, for the saved model."""
    if stream.scaling == "l2":
        return Normalizer().fit(np.zeros((1, stream.dim), dtype=np.float32))
    if stream.scaling == "standardize":
        scaler = StandardScaler()
        scaler.mean_ = stream.mean.cpu().double().numpy()
        scaler.scale_ = stream.scale.cpu().double().numpy()
        scaler.var_ = scaler.scale_ ** 2
        scaler.n_features_in_, scaler.n_samples_seen_ = stream.dim, 1
        return scaler
    return FunctionTransformer().fit(np.zeros((1, stream.dim), dtype=np.float32))


Pick = tuple[str, Solver, Callable[..., int]]  # the solver's name, the solver, its memory
Picker = Callable[[SolveShape, int], Pick]  # (the solve's shape, the thread cap) -> the solver


def solve_shape(stream: LayerStream, split: Split, options: ProbeOptions, *, grid: tuple[float, ...],
                ) -> SolveShape:
    """What the solve of this layer and split will cost, known before any row is read: the
    solver sees the training rows (kernel form: their coordinates, as many as the rows at most)."""
    n = len(split.train)
    problems = len(grid) * CV_FOLDS + 1 if options.C == "auto" else 1
    return SolveShape(rows=n, width=min(stream.dim, n), classes=len(stream.store.classes),
                      problems=problems, kernel_form=stream.dim > n, device=stream.device)


def train_linear(stream: LayerStream, split: Split, options: ProbeOptions, *, probe: str,
                 grid: tuple[float, ...], pick: Picker) -> tuple[ProbeResult, torch.Tensor, torch.Tensor]:
    """Fit on the training rows (C by cross-validation when `options.C` is auto) with the solver
    `pick` chooses for the solve's shape, score the test rows; returns the result and the weights
    and intercept on the layer's scaled values. Each stage runs on the threads its work is worth
    (featx.probes.threads)."""
    started = time.perf_counter()
    cap = thread_cap(options.threads)
    shape = solve_shape(stream, split, options, grid=grid)
    solver, solve, memory_per_problem = pick(shape, cap)
    n = len(split.train)
    gram = max(stream.block_flops(n), 4.0 * n ** 3) if shape.kernel_form else 0.0  # and its eigh
    with running_on(threads_for(gram, cap)):
        budget = stream.budget_left(options.memory)
        stream.fit_scaling(split.train, budget)
        training = training_rows(stream, split.train, budget, splits=solver == "torch")
    n_classes = len(stream.store.classes)
    n, d = training.x.shape
    problems = len(grid) * CV_FOLDS if options.C == "auto" else 1
    held = training.x.numel() + (training.rows.numel() if training.rows is not None else 0)
    room = budget - 4 * held  # what the solver may use beside the rows it holds
    at_once = max((p for p in range(1, problems + 1) if memory_per_problem(n, d, p,
                                                                           n_classes=n_classes) <= room),
                  default=0)
    if not at_once:
        need = memory_per_problem(n, d, 1, n_classes=n_classes)
        raise FeatxError(f"the {probe} solver needs {describe_bytes(need)} for layer {stream.name} "
                         f"({n} training rows, {d} columns, {n_classes} classes) beside what it holds: "
                         f"--memory {describe_bytes(options.memory - room + 2 * need)} would work")
    with running_on(torch_threads(shape, cap) if solver == "torch" else 1):
        if options.C == "auto":
            C, cv_scores, edge = choose_C_widening(training, grid, n_classes, seed=options.seed, solve=solve,
                                                   at_once=at_once)
        else:
            C, cv_scores, edge = float(options.C), {}, ""
        fit = solve(training.x, training.y, torch.ones((1, n), dtype=torch.bool, device=training.x.device),
                    C=torch.tensor([C], dtype=torch.float64), n_classes=n_classes, total=training.total)
    with running_on(threads_for(max(stream.block_flops(n_classes), 2.0 * n_classes * n * stream.dim), cap)):
        weights = feature_weights(stream, training, fit.coef[0], budget=budget)
        intercept = fit.intercept[0]
        y_pred = predict_rows(stream, split.test, weights, intercept=intercept, budget=budget)
    y_true = stream.labels[split.test]
    result = ProbeResult(
        layer=stream.name, dim=stream.dim, accuracy=float((y_pred == y_true).mean()),
        balanced_accuracy=balanced_accuracy(y_true, y_pred), C=C, scaling=stream.scaling,
        train_seconds=time.perf_counter() - started, kernel_form=stream.dim > len(split.train),
        n_train=len(split.train), n_test=len(split.test), converged=bool(fit.converged.all()),
        probe=probe, solver=solver, cv_scores=cv_scores, C_edge=edge, y_true=y_true.astype(np.int32),
        y_pred=y_pred.astype(np.int32))
    return result, weights, intercept


def liblinear_solver(seed: int, workers: int = 1) -> Solver:
    """scikit-learn's LinearSVC (liblinear, primal Newton) fitted per problem, in up to `workers`
    threads (liblinear releases the GIL; its fits wait on nothing), with the same interface as
    the torch solver; the reference the torch solver is checked against."""
    from sklearn.svm import LinearSVC

    def solve(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, *, C: torch.Tensor,
              n_classes: int, total: Total = whole) -> LinearFit:
        if total is not whole:
            raise ValueError("liblinear fits every row in one process; it takes no rows split between ranks")
        xs, ys = x.cpu().numpy(), y.cpu().numpy()

        def one(k: int) -> tuple[np.ndarray, np.ndarray, bool]:
            rows = masks[k].cpu().numpy()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf = LinearSVC(C=float(C[k]), dual=False, max_iter=5000, random_state=seed)
                clf.fit(xs[rows], ys[rows])
            coef, intercept = clf.coef_, clf.intercept_
            if len(coef) == 1:  # two classes: one score, as two opposite ones
                coef, intercept = np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
            return coef, intercept, not any(issubclass(w.category, ConvergenceWarning) for w in caught)

        order = sorted(range(len(C)), key=lambda k: -float(C[k]))  # slowest first: threads end together
        if workers == 1 or len(order) == 1:
            done = {k: one(k) for k in order}
        else:
            with ThreadPoolExecutor(min(workers, len(order))) as pool:
                done = dict(zip(order, pool.map(one, order)))
        fits = [done[k] for k in range(len(C))]
        device = x.device
        return LinearFit(
            coef=torch.as_tensor(np.stack([f[0] for f in fits]), dtype=torch.float32, device=device),
            intercept=torch.as_tensor(np.stack([f[1] for f in fits]), dtype=torch.float32, device=device),
            objective=torch.full((len(C),), float("nan"), dtype=torch.float64),
            converged=torch.tensor([f[2] for f in fits]), iterations=0)

    return solve


def liblinear_bytes(n: int, d: int, problems: int, *, n_classes: int, workers: int = 1) -> int:
    """Each concurrent fit (one per worker) copies its rows to float64 (8 bytes a value) and to
    liblinear's own feature nodes (16 bytes a value); the weights are float64."""
    return min(problems, workers) * 24 * n * (d + 1) + 8 * n_classes * (d + 1) * problems


def liblinear_pick(shape: SolveShape, cap: int, *, seed: int) -> Pick:
    """liblinear with its workers for this solve: one per fit, at most `cap`."""
    workers = liblinear_workers(shape, cap)
    return "liblinear", liblinear_solver(seed, workers), partial(liblinear_bytes, workers=workers)


__all__ = ["Training", "choose_C", "fitted_scaler", "liblinear_bytes", "liblinear_pick", "liblinear_solver",
           "solve_shape", "train_linear", "working_bytes"]
