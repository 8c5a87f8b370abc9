"""Batched squared-hinge and logistic solvers: same optima as liblinear / lbfgs, masks, devices."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from featx.probes.solvers import (
    LinearFit,
    decision,
    fit_logistic,
    fit_squared_hinge,
    primal_objective_logistic,
    primal_objective_svm,
    working_bytes,
)

CS = (0.1, 1.0, 10.0)


def _data(n: int, d: int, classes: int, seed: int = 0, separation: float = 0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, d))
    y = rng.integers(0, classes, n)
    x = centres[y] * separation + rng.normal(0, 1, (n, d))
    return x.astype(np.float32), y.astype(np.int64)


def _reference(loss: str, C: float):
    if loss == "hinge":
        return LinearSVC(C=C, loss="squared_hinge", dual=False, tol=1e-8, max_iter=10000)
    return LogisticRegression(C=C, tol=1e-10, max_iter=10000)


SOLVERS = {"hinge": (fit_squared_hinge, primal_objective_svm),
           "logistic": (fit_logistic, primal_objective_logistic)}


def _fit(loss: str, x, y, masks, C, classes: int, **kw) -> LinearFit:
    return SOLVERS[loss][0](torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(masks),
                            C=torch.as_tensor(C, dtype=torch.float64), n_classes=classes, **kw)


@pytest.mark.parametrize("loss", ["hinge", "logistic"])
@pytest.mark.parametrize(("n", "d", "classes"), [(240, 40, 4), (70, 120, 4), (200, 30, 2)])
def test_matches_scikit_learn(loss: str, n: int, d: int, classes: int) -> None:
    """Objective at most scikit-learn's (within 1e-3) and the same predictions on held-out rows."""
    x_all, y_all = _data(n + 200, d, classes)
    x, y, x_test = x_all[:n], y_all[:n], x_all[n:]
    fit = _fit(loss, x, y, np.ones((len(CS), n), bool), CS, classes)
    assert fit.converged.all()
    objective = SOLVERS[loss][1]
    for p, C in enumerate(CS):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a reference that did not converge is no reference
            ref = _reference(loss, C).fit(x.astype(np.float64), y)
        ours = objective(x, y, fit.coef[p], intercept=fit.intercept[p], C=C, n_classes=classes)
        theirs = objective(x, y, ref.coef_, intercept=ref.intercept_, C=C, n_classes=classes)
        assert ours <= theirs * (1 + 1e-3)
        assert abs(ours - theirs) <= 1e-3 * theirs
        assert fit.objective[p].item() == pytest.approx(ours, rel=1e-5)
        predicted = decision(fit, torch.from_numpy(x_test))[p].argmax(-1).numpy()
        assert (predicted == ref.predict(x_test)).mean() >= 0.99


def test_hinge_weights_equal_liblinear() -> None:
    """The squared-hinge optimum is unique: the weights themselves agree with liblinear's."""
    x, y = _data(240, 40, 4, seed=1)
    fit = _fit("hinge", x, y, np.ones((1, 240), bool), [1.0], 4, tol=1e-8)
    ref = _reference("hinge", 1.0).fit(x.astype(np.float64), y)
    np.testing.assert_allclose(fit.coef[0].numpy(), ref.coef_, atol=2e-4 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(fit.intercept[0].numpy(), ref.intercept_, atol=2e-4 * np.abs(ref.coef_).max())


@pytest.mark.parametrize("loss", ["hinge", "logistic"])
def test_two_classes(loss: str) -> None:
    """Two classes: one problem as scikit-learn solves it, returned as two opposite rows."""
    x, y = _data(200, 20, 2, seed=2)
    fit = _fit(loss, x, y, np.ones((1, 200), bool), [1.0], 2)
    assert fit.coef.shape == (1, 2, 20) and fit.intercept.shape == (1, 2)
    torch.testing.assert_close(fit.coef[0, 0], -fit.coef[0, 1])
    ref = _reference(loss, 1.0).fit(x.astype(np.float64), y)
    w = fit.coef[0, 1] - fit.coef[0, 0] if loss == "logistic" else fit.coef[0, 1]
    np.testing.assert_allclose(w.numpy(), ref.coef_[0], atol=1e-3 * np.abs(ref.coef_).max())
    scores = decision(fit, torch.from_numpy(x))[0]
    assert np.array_equal(scores.argmax(-1).numpy(), ref.predict(x))
    if loss == "logistic":  # softmax of the two scores is the class probability
        probabilities = torch.softmax(scores.double(), -1).numpy()
        np.testing.assert_allclose(probabilities, ref.predict_proba(x), atol=1e-4)


@pytest.mark.parametrize("loss", ["hinge", "logistic"])
def test_batched_equals_alone(loss: str) -> None:
    """Folds x Cs in one call give each problem's own solution."""
    x, y = _data(150, 25, 3, seed=3)
    x = x.astype(np.float64)  # double precision, so that a tight tolerance is reachable
    rng = np.random.default_rng(0)
    folds = [rng.random(150) < 0.7 for _ in range(3)]
    masks = np.array([m for m in folds for _ in CS])
    Cs = [C for _ in folds for C in CS]
    together = _fit(loss, x, y, masks, Cs, 3, tol=1e-10)
    assert together.converged.all()
    for p in range(len(Cs)):
        alone = _fit(loss, x, y, masks[p:p + 1], [Cs[p]], 3, tol=1e-10)
        torch.testing.assert_close(together.coef[p], alone.coef[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(together.intercept[p], alone.intercept[0], atol=1e-6, rtol=1e-6)
        # and each is that mask's fit on its rows alone
        cut = _fit(loss, x[masks[p]], y[masks[p]], np.ones((1, masks[p].sum()), bool), [Cs[p]], 3, tol=1e-10)
        torch.testing.assert_close(together.coef[p], cut.coef[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss", ["hinge", "logistic"])
def test_rows_outside_a_mask_do_not_count(loss: str) -> None:
    x, y = _data(160, 20, 4, seed=4)
    masks = np.ones((2, 160), bool)
    masks[0, 100:] = False
    first = _fit(loss, x, y, masks, [1.0, 1.0], 4)
    x2, y2 = x.copy(), y.copy()
    x2[100:] = np.random.default_rng(9).normal(0, 5, x2[100:].shape)
    y2[100:] = (y2[100:] + 1) % 4
    second = _fit(loss, x2, y2, masks, [1.0, 1.0], 4)
    torch.testing.assert_close(first.coef[0], second.coef[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first.intercept[0], second.intercept[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(first.coef[1], second.coef[1], atol=1e-3)  # the other problem saw them


@pytest.mark.parametrize("loss", ["hinge", "logistic"])
def test_types_and_devices(loss: str) -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    x, y = _data(120, 16, 3, seed=5)
    fits = []
    for device in devices:
        xt = torch.from_numpy(x).to(device)
        yt, masks = torch.from_numpy(y).to(device), torch.ones((2, 120), dtype=torch.bool, device=device)
        fit = SOLVERS[loss][0](xt, yt, masks, C=torch.tensor([0.5, 5.0], device=device), n_classes=3)
        assert fit.coef.shape == (2, 3, 16) and fit.intercept.shape == (2, 3)
        assert fit.coef.dtype == torch.float32 and fit.coef.device == xt.device
        assert fit.intercept.device == xt.device and fit.objective.device == xt.device
        assert fit.objective.dtype == torch.float64 and fit.converged.dtype == torch.bool
        assert fit.iterations > 0
        scores = decision(fit, xt)
        assert scores.shape == (2, 120, 3) and scores.device == xt.device
        fits.append(fit)
    for other in fits[1:]:  # CPU and GPU agree
        torch.testing.assert_close(other.coef.cpu(), fits[0].coef, atol=1e-3, rtol=1e-3)


def test_objective_functions_accept_scikit_learn_and_our_layouts() -> None:
    x, y = _data(100, 10, 2, seed=6)
    ref = LinearSVC(C=1.0, dual=False, tol=1e-8).fit(x, y)
    one = primal_objective_svm(x, y, ref.coef_, intercept=ref.intercept_, C=1.0, n_classes=2)
    both = np.vstack([-ref.coef_, ref.coef_]), np.r_[-ref.intercept_, ref.intercept_]
    two = primal_objective_svm(x, y, both[0], intercept=both[1], C=1.0, n_classes=2)
    assert one == pytest.approx(two)
    w, b = ref.coef_[0], ref.intercept_[0]
    t = np.where(y == 1, 1.0, -1.0)
    expected = 0.5 * (w @ w + b * b) + (np.maximum(0, 1 - t * (x @ w + b)) ** 2).sum()
    assert one == pytest.approx(expected, rel=1e-9)


def test_empty_mask_and_absent_class() -> None:
    x, y = _data(120, 12, 3, seed=7)
    masks = np.ones((3, 120), bool)
    masks[1] = False
    masks[2] = y != 2
    for loss in SOLVERS:
        fit = _fit(loss, x, y, masks, [1.0, 1.0, 1.0], 3)
        assert fit.converged.all() and torch.isfinite(fit.coef).all()
        assert fit.objective[1].item() == 0.0 and not fit.coef[1].any()


def test_working_bytes_grows_with_the_problem() -> None:
    small = working_bytes(1000, 1000, 16, n_classes=15)
    assert small >= 4 * 12 * 1000 * 16 * 15
    assert working_bytes(2000, 1000, 16, n_classes=15) > small and working_bytes(1000, 1000, 32,
                                                                                 n_classes=15) > small


def test_bad_input() -> None:
    x, y = _data(50, 5, 3)
    with pytest.raises(ValueError, match="labels"):
        _fit("hinge", x, y, np.ones((1, 50), bool), [1.0], 2)
    with pytest.raises(ValueError, match="shapes"):
        _fit("hinge", x, y, np.ones((1, 49), bool), [1.0], 3)
    with pytest.raises(ValueError, match="positive"):
        _fit("logistic", x, y, np.ones((1, 50), bool), [0.0], 3)
