"""Plots (PNG/SVG) and the self-contained HTML page, from a synthetic 15-class report."""

from __future__ import annotations

import base64
import io
import re
import xml.etree.ElementTree as ET
from html import escape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.report.html import write_html
from featx.report.plots import best_per_model, confusion_matrix, per_class_accuracy, plot_stem, write_plots
from featx.report.tables import LayerReport, ModelIdentity, Report, table_rows

CLASSES = ["MITcoast", "MITforest", "MIThighway", "MITinsidecity", "MITmountain",
           "MITopencountry", "MITstreet", "MITtallbuilding", "PARoffice", "bedroom",
           "CALsuburb", "industrial", "kitchen", "livingroom", "store"]


def make_layer(model: str, name: str, dim: int, hit_rate: float, rng: np.random.Generator,
               shared: list[str]) -> LayerReport:
    y_true = np.repeat(np.arange(len(CLASSES)), 12)
    y_pred = np.where(rng.random(y_true.size) < hit_rate, y_true,
                      rng.integers(0, len(CLASSES), y_true.size))
    return LayerReport(
        layer=name, model=model, dim=dim, accuracy=float(np.mean(y_true == y_pred)), C=0.1,
        scaling="l2", train_seconds=float(rng.uniform(0.2, 4)), kernel_form=False, n_train=1500,
        n_test=int(y_true.size), converged=True, cv_scores={"0.01": 0.71, "0.1": 0.8},
        y_true=y_true.tolist(), y_pred=y_pred.tolist(), feature_seconds=93.25,
        feature_shared_with=shared)


def make_identity(model: str, layers: list[str], random: bool) -> ModelIdentity:
    weights = f"{model}.random-seed0" if random else f"{model}.imagenet"
    return ModelIdentity(
        model=model, weights=weights, weights_random=random, weights_checksum="sha256:abc123",
        preprocess={"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"},
        cache=f"/cache/15-Scene/{weights}",
        extraction_runs=[{"layers": layers, "seconds": 93.25, "images": 4485,
                          "when": "2024-05-01T09:58:00+00:00", "device": "cuda",
                          "precision": "fp16"}])


def make_report(models: dict[str, list[tuple[str, int, float]]], random: bool = False) -> Report:
    rng = np.random.default_rng(7)
    layers = []
    for model, specs in models.items():
        shared = [name for name, _, _ in specs]
        layers += [make_layer(model, name, dim, rate, rng, shared) for name, dim, rate in specs]
    first = next(iter(models))
    return Report(
        title=f"{first} on 15-Scene ({'random weights' if random else 'imagenet'})",
        featx_version="0.1.0", created="2024-05-01T10:00:00+00:00",
        dataset="15-Scene", dataset_root="/data/15-Scene", classes=CLASSES,
        models=[make_identity(model, [name for name, _, _ in specs], random)
                for model, specs in models.items()],
        layers=layers, split="100 training images per class, seed 0", seed=0,
        train_per_class=100, split_file=None, splits=1, scaling="l2", C_option="auto",
        skipped={"MITcoast/broken_<1>.jpg": "cannot identify image file",
                 "store/empty.jpg": "truncated"},
        versions={"featx": "0.1.0", "python": "3.11.2", "numpy": np.__version__})


def labelled(y_true: list[int], y_pred: list[int]) -> LayerReport:
    """A layer with just these labels; the other fields are placeholders."""
    return LayerReport(layer="x", model="m", dim=1, accuracy=0.0, C=1.0, scaling="none",
                       train_seconds=0.0, kernel_form=False, n_train=0, n_test=len(y_true),
                       converged=True, y_true=y_true, y_pred=y_pred)


VGG = {"vgg16": [("features.16", 100352, 0.55), ("features.23", 100352, 0.7),
                 ("features.30", 25088, 0.85)]}


@pytest.fixture(scope="module")
def report() -> Report:
    report = make_report(VGG)
    last = report.layers[-1]
    last.accuracy_std = 0.0123
    last.split_accuracies = [last.accuracy - 0.0123, last.accuracy + 0.0123]
    return report


@pytest.fixture(scope="module")
def plots(report: Report, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return write_plots(report, tmp_path_factory.mktemp("plots"), svg=True)


def embedded_pngs(page: str) -> list[Image.Image]:
    images = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        assert image.format == "PNG"
        images.append(image)
    return images


def test_confusion_matrix_counts_by_hand() -> None:
    layer = labelled([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2])
    expected = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(confusion_matrix(layer, 4), expected)
    accuracy = per_class_accuracy(layer, 4)
    np.testing.assert_allclose(accuracy[:3], [0.5, 1.0, 2 / 3])
    assert np.isnan(accuracy[3])  # no test image of class 3
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(labelled([0, 3], [0, 0]), 3)
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix(labelled([0, 1], [0]), 3)


def test_the_json_keeps_the_confusion_matrix_and_older_reports_still_draw(tmp_path) -> None:
    from featx.report.tables import confusion_counts

    y_true, y_pred = np.array([0, 0, 1, 2, 2, 2] * 20000), np.array([0, 1, 1, 2, 0, 2] * 20000)
    expected = np.bincount(3 * y_true + y_pred, minlength=9).reshape(3, 3)
    np.testing.assert_array_equal(confusion_counts(y_true, y_pred, 3), expected)  # counted in blocks
    layer = labelled(y_true.tolist(), y_pred.tolist())
    layer.confusion = expected.tolist()
    saved = layer.to_dict()
    assert saved["confusion"] == expected.tolist() and not {"y_true", "y_pred", "test_rows"} & set(saved)
    np.testing.assert_array_equal(confusion_matrix(LayerReport.from_dict(saved), 3), expected)
    older = {**saved, "y_true": y_true.tolist(), "y_pred": y_pred.tolist()}  # featx 0.1's layout
    del older["confusion"]
    np.testing.assert_array_equal(confusion_matrix(LayerReport.from_dict(older), 3), expected)


def test_plot_files(report: Report, plots: dict[str, list[Path]]) -> None:
    stems = {"accuracy"} | {plot_stem(kind, layer) for layer in report.layers
                            for kind in ("confusion", "per_class")}
    assert set(plots) == stems
    assert "confusion_vgg16_features.30" in plots
    for stem, paths in plots.items():
        assert sorted(p.suffix for p in paths) == [".png", ".svg"]
        png, svg = sorted(paths, key=lambda p: p.suffix)
        assert png.name == f"{stem}.png"
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG"
            assert image.width >= 600 and image.height >= 500, (stem, image.size)
        assert ET.parse(svg).getroot().tag.endswith("svg")
    # 15 classes with long names get a big enough confusion matrix to read
    with Image.open(plots["confusion_vgg16_features.30"][0]) as image:
        assert min(image.size) >= 900


def test_plots_leave_no_pyplot_figures(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    write_plots(make_report({"vgg16": VGG["vgg16"][:1]}), tmp_path)
    assert plt.get_fignums() == before


def test_html_page(report: Report, tmp_path: Path) -> None:
    path = write_html(report, tmp_path / "out" / "report.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert escape(report.title) in page
    for row in table_rows(report):
        for value in row.values():
            assert f"<td>{escape(value)}</td>" in page
    assert "+/- 0.0123" in page
    assert len(embedded_pngs(page)) == 1 + 2 * len(report.layers)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert escape("MITcoast/broken_<1>.jpg") in page and "store/empty.jpg" in page
    assert "broken_<1>" not in page  # escaped, never raw
    assert "RANDOM" not in page
    for text in ("sha256:abc123", "bilinear", "fp16", "100 training images per class",
                 "Training images per class", "3.11.2", "features.30"):
        assert text in page, text
    best, runner_up = sorted(report.layers, key=lambda layer: layer.accuracy, reverse=True)[:2]
    assert (f'<p class="best">Best layer: vgg16 {best.layer} at {100 * best.accuracy:.2f}% test accuracy, '
            f"{100 * (best.accuracy - runner_up.accuracy):.2f} points above the next best, "
            f"vgg16 {runner_up.layer} at {100 * runner_up.accuracy:.2f}%.</p>") in page


def test_html_random_weights_and_no_skips(tmp_path: Path) -> None:
    report = make_report({"vgg16": VGG["vgg16"][:1]}, random=True)
    report.skipped = {}
    page = write_html(report, tmp_path / "r.html").read_text()
    assert 'class="warn"><strong>RANDOM weights</strong> (vgg16.random-seed0)' in page
    assert "<h2>Skipped images</h2>\n<p>none</p>" in page


def test_html_with_given_plots(report: Report, plots: dict[str, list[Path]],
                               tmp_path: Path) -> None:
    page = write_html(report, tmp_path / "r.html", plots).read_text()
    expected = plots["accuracy"][0].read_bytes()
    assert base64.b64encode(expected).decode() in page
    assert len(embedded_pngs(page)) == len(plots)


def test_multi_model(tmp_path: Path) -> None:
    report = make_report({**VGG, "resnet50": [("layer3", 1024, 0.75), ("avgpool", 2048, 0.9)]})
    plots = write_plots(report, tmp_path / "plots")
    assert {"confusion_resnet50_avgpool", "per_class_vgg16_features.16", "best_per_model"} <= set(plots)
    assert len(plots) == 2 + 2 * 5
    best = best_per_model(report)
    assert [layer.model for layer in best] == sorted({"vgg16", "resnet50"},
                                                     key=lambda m: -max(x.accuracy for x in report.layers
                                                                        if x.model == m))
    assert all(layer.accuracy == max(x.accuracy for x in report.layers if x.model == layer.model)
               for layer in best)
    page = write_html(report, tmp_path / "r.html", plots).read_text()
    assert "<h2>Best layer per model</h2>" in page
    assert "<th>Model</th>" in page
    assert "<td>resnet50</td>" in page and "<td>vgg16</td>" in page
    assert "<h2>resnet50 avgpool:" in page
    assert len(embedded_pngs(page)) == len(plots)


def test_html_escapes_report_text(tmp_path: Path) -> None:
    report = make_report(VGG)
    report.title = "<script>alert(1)</script>"
    page = write_html(report, tmp_path / "r.html", plots={}).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "data:image/png" not in page
