"""The probes on a cache: streaming reads, kernel form, C by cross-validation, the memory budget,
the saved models, logistic regression, k-NN and balanced accuracy."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, normalize
from sklearn.svm import LinearSVC

from featx.cache.store import DamagedShard, FeatureStore
from featx.data.splits import Split, seeded_split
from featx.errors import FeatxError
from featx.probes import ProbeOptions, balanced_accuracy, get_probe
from featx.probes.stream import LayerStream
from featx.study import ProbingOptions

from conftest import array_store, problem


def train(store: FeatureStore, name: str, split: Split, probe: str = "svm", scaling: str = "l2",
          memory: int = 1 << 30, **options):
    stream = LayerStream(store, name, scaling, device="cpu")
    return get_probe(probe).train(stream, split, ProbeOptions(memory=memory, **options))


@pytest.mark.parametrize("solver", ["torch", "liblinear"])
def test_kernel_form_predicts_as_linear_svc_on_the_raw_features(tmp_path, solver) -> None:
    x, y, split = problem()
    store = array_store(tmp_path, {"layer": x}, y)
    result, model = train(store, "layer", split, C=0.5, solver=solver)
    assert result.kernel_form and len(split.train) < x.shape[1] and result.solver == solver
    assert train(store, "layer", split, C=0.5)[0].solver == "liblinear"  # auto: a small problem
    xs = normalize(x)
    reference = LinearSVC(C=0.5, max_iter=20000, tol=1e-8).fit(xs[split.train], y[split.train])
    expected = reference.predict(xs[split.test])
    assert np.mean(np.asarray(result.y_pred) == expected) >= 0.98
    assert abs(result.accuracy - (expected == y[split.test]).mean()) <= 0.02
    # the saved model applies to raw features and agrees with the streamed predictions
    assert np.array_equal(model.predict(x[split.test]), np.asarray(result.y_pred))
    np.testing.assert_allclose(model.named_steps["svm"].coef_, reference.coef_, atol=5e-3)


def test_a_layer_larger_than_the_budget_streams_in_chunks_and_gives_the_same_classifier(tmp_path) -> None:
    x, y, split = problem(dim=3000)
    store = array_store(tmp_path, {"layer": x}, y)
    whole, whole_model = train(store, "layer", split, C=1.0)
    # 90 rows x 3000 values x 4 bytes = 1 MB: a budget of 128 KB of rows holds a few at a time
    stream = LayerStream(store, "layer", "l2", device="cpu")
    assert not stream.hold(len(stream.index) * stream.row_bytes - 1)
    from featx.probes.linear import train_gram

    gram, rows = train_gram(stream, split.train, 8 * len(split.train) ** 2 * 3 + 200_000)
    assert rows is None  # chunked: the training rows were never held together
    xs = normalize(x)[split.train]
    np.testing.assert_allclose(gram.numpy(), xs @ xs.T, atol=1e-5)
    small, small_model = train(store, "layer", split, C=1.0, memory=4 << 20)
    assert np.array_equal(small.y_pred, whole.y_pred)
    np.testing.assert_allclose(small_model.named_steps["svm"].coef_, whole_model.named_steps["svm"].coef_,
                               atol=1e-4)


def test_features_are_used_directly_when_there_are_more_images_than_dimensions(tmp_path) -> None:
    x, y, split = problem(n_per_class=40, dim=10)
    store = array_store(tmp_path, {"layer": x}, y)
    result, model = train(store, "layer", split, C=1.0, scaling="standardize")
    assert not result.kernel_form and result.solver == "liblinear"  # what auto picks for a small one
    assert result.n_train == 60 and result.n_test == 60 and result.dim == 10
    reference = make_pipeline(StandardScaler(), LinearSVC(C=1.0, tol=1e-8, max_iter=20000)).fit(
        x[split.train], y[split.train])
    assert np.mean(np.asarray(result.y_pred) == reference.predict(x[split.test])) >= 0.98
    assert np.array_equal(model.predict(x[split.test]), np.asarray(result.y_pred))


def test_C_auto_picks_the_best_cross_validated_value(tmp_path) -> None:
    x, y, split = problem(n_per_class=40, dim=60, classes=4, separation=0.25)
    store = array_store(tmp_path, {"layer": x}, y)
    from featx.probes.svm import C_GRID

    xs, ys = normalize(x)[split.train], y[split.train]
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(xs, ys))
    expected = {C: np.mean([(LinearSVC(C=C, dual=False, tol=1e-8).fit(xs[a], ys[a]).predict(xs[b])
                             == ys[b]).mean() for a, b in folds]) for C in C_GRID}
    result, _ = train(store, "layer", split)
    assert result.cv_scores == pytest.approx({f"{C:g}": v for C, v in expected.items()}, abs=0.02)
    assert len(set(expected.values())) > 1  # the choice mattered on this problem
    best = max(result.cv_scores.values())
    assert result.C == min(C for C in C_GRID if result.cv_scores[f"{C:g}"] == best)  # ties: smaller C


def test_logistic_regression_matches_scikit_learn(tmp_path) -> None:
    x, y, split = problem(n_per_class=40, dim=30, classes=4, separation=0.3)
    store = array_store(tmp_path, {"layer": x}, y)
    result, model = train(store, "layer", split, probe="logreg", C=10.0)
    xs = normalize(x)
    reference = LogisticRegression(C=10.0, tol=1e-10, max_iter=10000).fit(xs[split.train], y[split.train])
    assert result.probe == "logreg" and result.C == 10.0
    assert np.mean(np.asarray(result.y_pred) == reference.predict(xs[split.test])) >= 0.98
    np.testing.assert_allclose(model.predict_proba(x[split.test]), reference.predict_proba(xs[split.test]),
                               atol=2e-3)


def test_knn_votes_like_a_weighted_neighbour_search(tmp_path) -> None:
    x, y, split = problem(n_per_class=40, dim=50, classes=3, separation=0.3)
    store = array_store(tmp_path, {"layer": x}, y)
    result, model = train(store, "layer", split, probe="knn", memory=64 << 20)
    assert model is None and result.C is None  # no C
    xs = normalize(x)
    sims = xs[split.test] @ xs[split.train].T
    top = np.argsort(-sims, axis=1)[:, :20]
    votes = np.zeros((len(split.test), 3))
    for i, row in enumerate(top):
        np.add.at(votes[i], y[split.train][row], np.exp(sims[i, row] / 0.07))
    assert result.y_pred.tolist() == votes.argmax(1).tolist()
    # scikit-learn's neighbour search with the same weights: cosine distance d, weight exp((1 - d) / T)
    reference = KNeighborsClassifier(20, metric="cosine", weights=lambda d: np.exp((1 - d) / 0.07))
    reference.fit(xs[split.train], y[split.train])
    assert np.mean(reference.predict(xs[split.test]) == np.asarray(result.y_pred)) >= 0.98


def test_knn_with_training_rows_in_several_chunks_equals_one_chunk(tmp_path) -> None:
    x, y, split = problem(n_per_class=40, dim=2000, classes=3)
    store = array_store(tmp_path, {"layer": x}, y)
    whole, _ = train(store, "layer", split, probe="knn", memory=64 << 20)
    # 60 training rows of 8000 bytes: a budget of 200 KB holds 12 of them at a time
    chunked, _ = train(store, "layer", split, probe="knn", memory=200_000)
    assert np.array_equal(chunked.y_pred, whole.y_pred)


@pytest.mark.parametrize("k", [20, 3])
def test_knn_scores_the_test_rows_a_part_at_a_time_within_a_small_budget(tmp_path, k) -> None:
    """The training rows in one chunk, the test rows in parts: the predictions of a large budget."""
    x, y, split = problem(n_per_class=100, dim=8, classes=12, separation=1.0)
    store = array_store(tmp_path, {"layer": x}, y, shard_size=64)
    whole, _ = train(store, "layer", split, probe="knn", memory=64 << 20, params={"k": k})
    # a 40 KB budget: the 600 training rows (19.2 KB) are one chunk; k 20: parts of 20 test rows;
    # k 3: parts of 138, their votes (12 classes) in slices of 52 rows
    parted, _ = train(store, "layer", split, probe="knn", memory=40_000, params={"k": k})
    assert np.array_equal(parted.y_pred, whole.y_pred) and len(whole.y_pred) == 600
    assert whole.accuracy > 0.5


def test_combinations_stream_like_the_layers_read_whole(tmp_path) -> None:
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 20)
    layers = {"a": rng.normal(size=(60, 7)).astype(np.float32),
              "b": rng.normal(size=(60, 90)).astype(np.float32)}
    store = array_store(tmp_path, layers, y, shard_size=16, missing=(5, 33))
    # b is wider, so its shards hold fewer rows: the parts line up all the same
    assert store.manifest.layers["a"].shard_size == 16
    stream = LayerStream(store, "a+b", "none", device="cpu")
    kept = np.array([i for i in range(60) if i not in (5, 33)])
    # each part read whole, scaled to unit length, side by side
    whole = np.hstack([x[kept] / np.linalg.norm(x[kept], axis=1, keepdims=True) for x in layers.values()])
    assert np.array_equal(stream.index, kept)
    streamed = np.concatenate([block.numpy() for _, block in stream.blocks(7)])
    np.testing.assert_allclose(streamed, whole, atol=1e-6)


def test_a_damaged_shard_stops_a_streamed_probe_naming_it(tmp_path) -> None:
    x, y, split = problem()
    store = array_store(tmp_path, {"layer": x}, y)
    path = store.shard_path("layer", 2)
    with h5py.File(path, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset  # where the first values lie
    data = bytearray(path.read_bytes())
    data[offset + 1000] ^= 0xFF  # a flipped byte inside the features
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedShard, match="shard-00002"):
        train(store, "layer", split, C=1.0)


def test_a_budget_too_small_says_which_would_work(tmp_path) -> None:
    x, y, split = problem(dim=3000)
    store = array_store(tmp_path, {"layer": x}, y)
    with pytest.raises(FeatxError, match=r"--memory \d+M or more would work"):
        train(store, "layer", split, C=1.0, memory=70_000)


def test_balanced_accuracy_is_the_mean_recall_per_class() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 0, 0, 1])
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((1.0 + 0.5) / 2)
    assert (y_true == y_pred).mean() == pytest.approx(5 / 6)


@pytest.mark.parametrize("kwargs, message", [
    ({"C": -1.0}, "C must be a positive"), ({"C": "big"}, "C must be a positive number"),
    ({"C": float("nan")}, "C must be a positive finite"), ({"C": "inf"}, "C must be a positive finite"),
    ({"scaling": "minmax"}, "scaling must be one of"), ({"splits": 0}, "splits must be a whole number"),
    ({"train_per_class": 0}, "train_per_class must be 1 to 20 whole numbers"),
    ({"probe": "tree"}, "probe must be"),
    ({"probe": "svm,tree"}, "probe must be"), ({"solver": "sgd"}, "solver must be one of"),
    ({"memory": "lots"}, "memory must be a size"), ({"memory": "1M"}, "memory must be at least"),
    ({"device": "tpu"}, "device must be"),
])
def test_bad_svm_options_are_refused_when_made(kwargs, message) -> None:
    with pytest.raises(FeatxError, match=message):
        ProbingOptions(**kwargs)
    assert ProbingOptions(C="0.5").C == 0.5
    assert ProbingOptions(probe="svm, knn").probe == ("svm", "knn")
    assert ProbingOptions(memory="1.5G").memory == 3 << 29


def test_a_device_out_of_memory_is_one_clear_line_and_touches_no_cache_file(tmp_path, monkeypatch) -> None:
    import torch

    import featx.study
    from featx.study import evaluate

    x, y, _ = problem()
    store = array_store(tmp_path / "cache", {"layer": x}, y)
    before = {p: p.read_bytes() for p in store.folder.rglob("*") if p.is_file()}

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(featx.study, "get_probe",
                        lambda name: dataclasses.replace(get_probe(name), train=exhausted))
    with pytest.raises(FeatxError, match=r"cpu ran out of memory for the svm probe on layer layer "
                                         r"with --memory 2\.0G; a smaller --memory would fit"):
        evaluate(store, ["layer"], ProbingOptions(device="cpu", train_per_class=10), out_dir=tmp_path / "out")
    assert {p: p.read_bytes() for p in store.folder.rglob("*") if p.is_file()} == before


def test_knn_first_over_several_splits_tables_without_a_C(tmp_path) -> None:
    import json

    from featx.report.html import write_html
    from featx.report.tables import render_markdown, write_table
    from featx.study import evaluate

    x, y, _ = problem(n_per_class=20, dim=30, classes=3)
    store = array_store(tmp_path / "cache", {"layer": x}, y)
    report = evaluate(store, ["layer"], ProbingOptions(probe="knn,svm", splits=2, train_per_class=8, C=1.0),
                      out_dir=tmp_path / "out")
    layer = report.layers[0]
    assert layer.probe == "knn" and layer.C is None and len(layer.split_accuracies) == 2
    assert layer.other_probes[0].probe == "svm" and layer.other_probes[0].accuracy_std is not None
    table = render_markdown(report)
    assert "| knn Accuracy | knn Balanced | svm Accuracy |" in table and "| svm C |" in table
    paths = write_table(report, tmp_path / "out")
    def not_json(constant: str):
        raise AssertionError(f"{constant} in the report JSON")

    saved = json.loads(paths["json"].read_text(), parse_constant=not_json)  # strict JSON: C is null
    assert saved["layers"][0]["C"] is None
    page = write_html(report, tmp_path / "page.html", {}).read_text()
    assert "svm: accuracy" in page and "knn" in page


def test_the_linear_probes_of_a_layer_share_its_training_rows_and_gram(tmp_path, monkeypatch) -> None:
    from featx.probes import linear

    x, y, split = problem(dim=500)
    store = array_store(tmp_path, {"layer": x}, y)
    stream = LayerStream(store, "layer", "l2", device="cpu")
    made = []
    real = linear._training_rows
    monkeypatch.setattr(linear, "_training_rows", lambda *args, **kw: made.append(1) or real(*args, **kw))
    svm, _ = get_probe("svm").train(stream, split, ProbeOptions(C=1.0, memory=1 << 30))
    logreg, _ = get_probe("logreg").train(stream, split, ProbeOptions(C=1.0, memory=1 << 30))
    assert len(made) == 1 and svm.kernel_form and logreg.kernel_form
    other = seeded_split(y, ("c0", "c1", "c2"), 10, seed=5)  # another split: made anew
    get_probe("logreg").train(stream, other, ProbeOptions(C=1.0, memory=1 << 30))
    assert len(made) == 2


def test_a_probe_stopped_at_its_step_limit_is_flagged_everywhere(tmp_path, monkeypatch) -> None:
    """A solve that ends at its Newton step limit, short of its tolerance, is said on the layer's
    line, in the table's notes and in the JSON, for a further probe as for the first."""
    import json

    from featx.probes import solvers

    from conftest import run_cli

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 60)
    x = (rng.normal(size=(4, 16))[labels] * 0.5 + rng.normal(size=(240, 16))).astype(np.float32)
    array_store(tmp_path / "c", {"a": x}, labels)
    newton = solvers._newton

    def two_steps_for_logreg(x, model, reg, *, max_iter, **kwargs):
        return newton(x, model, reg, max_iter=2 if isinstance(model, solvers._Multinomial) else max_iter,
                      **kwargs)

    monkeypatch.setattr(solvers, "_newton", two_steps_for_logreg)
    result = run_cli("svm", "--cache", str(tmp_path / "c"), "--probe", "svm,logreg", "--C", "100",
                     "--train-per-class", "30", "--device", "cpu", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "accuracy" in line]
    lines = {probe: [line for line in said if f" {probe} " in line] for probe in ("svm", "logreg")}
    assert "NOT CONVERGED" in lines["logreg"][0] and "NOT CONVERGED" not in lines["svm"][0]
    notes = (tmp_path / "out" / "svm.md").read_text()
    assert "Not converged (logreg: its solver stopped short of its tolerance" in notes
    assert "rounding can still move these accuracies): a." in notes
    row = json.loads((tmp_path / "out" / "svm.json").read_text())["layers"][0]
    assert row["converged"] is True and row["other_probes"][0]["converged"] is False


def test_a_C_at_the_end_of_its_grid_widens_the_search_and_is_flagged_where_it_stays(tmp_path,
                                                                                    monkeypatch) -> None:
    """Cross-validation that picks an end of its grid looks a decade further at a time; a C that
    still ends there is named in the table's notes; a flat score is no reason to look further."""
    import json

    from featx.probes import linear, svm

    from conftest import run_cli

    x, y, split = problem(n_per_class=40, dim=60, classes=4, separation=0.25)
    store = array_store(tmp_path / "c", {"layer": x}, y)
    monkeypatch.setattr(svm, "C_GRID", (0.001, 0.01))  # too small for this problem: best at the top
    widened, _ = train(store, "layer", split)
    assert list(widened.cv_scores) == ["0.001", "0.01", "0.1", "1"]  # 1 scored below 0.1: no further
    assert widened.C == 0.1 and widened.C_edge == ""
    monkeypatch.setattr(linear, "WIDEN_DECADES", 0)
    kept, _ = train(store, "layer", split)
    assert kept.C == 0.01 and kept.C_edge == "top"
    result = run_cli("svm", "--cache", str(tmp_path / "c"), "--train-per-class", "20", "--device", "cpu",
                     "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    notes = (tmp_path / "out" / "svm.md").read_text()
    assert "C chosen at an end of the grid cross-validation searched" in notes and "(C 0.01, the top" in notes
    assert json.loads((tmp_path / "out" / "svm.json").read_text())["layers"][0]["C_edge"] == "top"
    flat_x, flat_y, flat_split = problem(n_per_class=40, dim=60, classes=4, separation=0.8)
    flat, _ = train(array_store(tmp_path / "flat", {"layer": flat_x}, flat_y), "layer", flat_split)
    assert set(flat.cv_scores.values()) == {1.0} and flat.C == 0.001 and flat.C_edge == ""


@pytest.mark.parametrize("solver", ["liblinear", "torch"])
def test_a_layer_whose_readable_rows_are_of_one_class_is_refused_in_one_line(tmp_path, solver) -> None:
    """Every image of the other class unreadable: the seeded split would train on one class."""
    from featx.study import evaluate

    labels = np.repeat([0, 1], 8)
    x = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
    store = array_store(tmp_path, {"x": x}, labels, shard_size=4, missing=tuple(range(8, 16)))
    with pytest.raises(FeatxError, match=r"trains on 1 class; a probe needs at least two"):
        evaluate(store, ["x"], ProbingOptions(train_per_class=2, solver=solver), out_dir=tmp_path / "out",
                 checked=True)
