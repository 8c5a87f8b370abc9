"""The SVM stage: kernel form equals LinearSVC, C selection, scaling, the saved model."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, normalize
from sklearn.svm import LinearSVC

from featx.data import seeded_split
from featx.errors import FeatxError
from featx.probes.svm import C_GRID, KernelProjection, choose_C, train_layer
from featx.store import LayerFeatures
from featx.study import SvmOptions


def _problem(n_per_class: int = 30, dim: int = 400, classes: int = 3, seed: int = 0,
             separation: float = 0.4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    features = (centres[labels] * separation + rng.normal(0, 1, (len(labels), dim))).astype(np.float32)
    split = seeded_split(labels, tuple(f"c{i}" for i in range(classes)), n_per_class // 2, seed)
    return LayerFeatures("layer", features, np.arange(len(labels)), labels), split


def test_kernel_form_predicts_as_linear_svc_on_the_raw_features() -> None:
    data, split = _problem()
    assert len(split.train) < data.dim  # the kernel form is used
    result, model = train_layer(LayerFeatures("layer", data.features.copy(), data.index, data.labels),
                                split, C=0.5, scaling="l2")
    assert result.kernel_form
    x = normalize(data.features)
    reference = LinearSVC(C=0.5, max_iter=20000, tol=1e-6).fit(x[split.train], data.labels[split.train])
    expected = reference.predict(x[split.test])
    assert np.array_equal(np.asarray(result.y_pred), expected)
    assert result.accuracy == pytest.approx((expected == data.labels[split.test]).mean())
    # the saved model applies to raw features and agrees with the kernel-form predictions
    assert np.array_equal(model.predict(data.features[split.test]), expected)
    np.testing.assert_allclose(model.named_steps["svm"].coef_, reference.coef_, atol=2e-3)


def test_kernel_projection_preserves_inner_products_with_the_training_rows() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 50)).astype(np.float32)
    train = np.arange(8)
    z = KernelProjection().fit_transform(x, train)
    np.testing.assert_allclose(z @ z[train].T, x @ x[train].T, rtol=1e-3, atol=1e-3)


def test_kernel_weights_map_back_to_every_feature_column() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 20000)).astype(np.float32)  # wider than one block of columns
    projection = KernelProjection()
    z = projection.fit_transform(x, np.arange(6))
    coef = rng.normal(size=(3, z.shape[1]))
    weights = projection.to_feature_space(coef)
    assert weights.shape == (3, 20000)
    np.testing.assert_allclose(x @ weights.T, z @ coef.T, rtol=1e-3, atol=1e-3)


def test_features_are_used_directly_when_there_are_more_images_than_dimensions() -> None:
    data, split = _problem(n_per_class=40, dim=10)
    raw = data.features.copy()
    result, model = train_layer(data, split, C=1.0, scaling="standardize")
    assert not result.kernel_form
    assert result.n_train == 60 and result.n_test == 60 and result.dim == 10
    reference = make_pipeline(StandardScaler(), LinearSVC(C=1.0)).fit(raw[split.train],
                                                                     data.labels[split.train])
    assert np.array_equal(np.asarray(result.y_pred), reference.predict(raw[split.test]))
    assert np.array_equal(model.predict(raw[split.test]), reference.predict(raw[split.test]))


def test_C_auto_picks_the_best_cross_validated_value() -> None:
    data, split = _problem(n_per_class=40, dim=60, classes=4, separation=0.25)
    x, y = normalize(data.features)[split.train], data.labels[split.train]
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(x, y))
    expected = {C: np.mean([(LinearSVC(C=C, dual=False, random_state=0).fit(x[a], y[a]).predict(x[b])
                             == y[b]).mean() for a, b in folds]) for C in C_GRID}
    best, scores = choose_C(x, y, seed=0, dual=False)
    assert scores == pytest.approx({f"{C:g}": v for C, v in expected.items()})
    top = max(expected.values())
    assert best == min(C for C, v in expected.items() if v == top)  # ties go to the smaller C
    assert len(set(expected.values())) > 1  # the choice mattered on this problem
    result, _ = train_layer(data, split, C="auto", scaling="l2")
    assert result.C == best and result.cv_scores == scores


def test_C_search_in_threads_scores_as_one_thread() -> None:
    data, split = _problem(n_per_class=24, classes=4, seed=3)
    x, y = normalize(data.features)[split.train], data.labels[split.train]
    one = choose_C(x, y, seed=0, jobs=1)
    assert choose_C(x, y, seed=0, jobs=2) == one
    assert list(one[1]) == ["0.01", "0.1", "1", "10", "100"]
    # and each score is the mean held-out accuracy of LinearSVC on the same folds
    folds = StratifiedKFold(3, shuffle=True, random_state=0).split(x, y)
    expected = np.mean([(LinearSVC(C=10.0).fit(x[a], y[a]).predict(x[b]) == y[b]).mean() for a, b in folds])
    assert one[1]["10"] == pytest.approx(expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"C": -1.0}, "C must be a positive"), ({"C": "big"}, "C must be a positive number"),
    ({"C": float("nan")}, "C must be a positive finite"), ({"C": "inf"}, "C must be a positive finite"),
    ({"scaling": "minmax"}, "scaling must be one of"), ({"splits": 0}, "splits must be at least 1"),
    ({"train_per_class": 0}, "train_per_class must be at least 1"), ({"probe": "tree"}, "probe must be"),
])
def test_bad_svm_options_are_refused_when_made(kwargs, message) -> None:
    with pytest.raises(FeatxError, match=message):
        SvmOptions(**kwargs)
    assert SvmOptions(C="0.5").C == 0.5
