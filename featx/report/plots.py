"""Figures of a study report: accuracy, feature dimension and times per layer, and per layer a
confusion matrix and per-class accuracy, as PNG and SVG.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing global changes.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np

from featx.errors import FeatxError
from featx.report.tables import LayerReport, Report, confusion_counts

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
except ImportError:  # matplotlib is the optional "plot" extra
    raise FeatxError("plots need matplotlib: pip install 'featx[plot]'") from None

FORMATS = ("png", "svg")  # PNG always (the HTML page embeds it), SVG on request
DPI = 120
ANNOTATE_MAX_CLASSES = 20


def confusion_matrix(layer: LayerReport, n_classes: int) -> np.ndarray:
    """Counts (n_classes, n_classes) of one layer's test predictions: rows true, columns
    predicted (the report's matrix; from the predictions where a report has none)."""
    if layer.confusion:
        counts = np.asarray(layer.confusion, dtype=np.int64)
        if counts.shape != (n_classes, n_classes):
            raise ValueError(f"layer {layer.layer}: a {counts.shape} confusion matrix, {n_classes} classes")
        return counts
    try:
        return confusion_counts(layer.y_true, layer.y_pred, n_classes)
    except ValueError as error:
        raise ValueError(f"layer {layer.layer}: {error}") from None


def per_class_accuracy(layer: LayerReport, n_classes: int) -> np.ndarray:
    """Share of each class's test images predicted correctly; NaN for a class without any."""
    counts = confusion_matrix(layer, n_classes)
    totals = counts.sum(axis=1)
    return np.divide(np.diag(counts), totals, out=np.full(n_classes, np.nan), where=totals > 0)


def plot_stem(kind: str, layer: LayerReport) -> str:
    """File stem of a per-layer figure: `<kind>_<model>_<layer>`, safe as a file name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{layer.model}_{layer.layer}")
    return f"{kind}_{safe}"


def literal_text():
    """Figures draw every text as it is: a class or dataset name with `$...$` in it is a name,
    not mathematics to typeset."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False})


def write_plots(report: Report, out_dir: Path, *, svg: bool = False) -> dict[str, list[Path]]:
    """Write accuracy.png and, per layer, confusion_<model>_<layer>.png and
    per_class_<model>_<layer>.png (each also as .svg where `svg`); return {stem: [png path, (svg
    path)]} (empty without layers)."""
    formats = FORMATS if svg else FORMATS[:1]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not report.layers:
        return {}
    with literal_text():
        written = {"accuracy": _save(_accuracy_figure(report), out_dir, "accuracy", formats)}
        if report.multi_model:
            written["best_per_model"] = _save(_best_per_model_figure(report), out_dir, "best_per_model",
                                              formats)
        if any(layer.curve for layer in report.layers):
            written["learning_curve"] = _save(_curve_figure(report), out_dir, "learning_curve", formats)
        for layer in report.layers:
            for kind, draw in (("confusion", _confusion_figure), ("per_class", _per_class_figure)):
                stem = plot_stem(kind, layer)
                written[stem] = _save(draw(report, layer), out_dir, stem, formats)
    return written


def best_per_model(report: Report) -> list[LayerReport]:
    """Each model's best layer, best model first."""
    models = list(dict.fromkeys(layer.model for layer in report.layers))
    best = [max((layer for layer in report.layers if layer.model == m), key=lambda layer: layer.accuracy)
            for m in models]
    return sorted(best, key=lambda layer: -layer.accuracy)


def _best_per_model_figure(report: Report) -> Figure:
    """One bar per model: the test accuracy of its best layer, named on the bar."""
    best = best_per_model(report)
    fig = _figure(7.5, 1.2 + 0.55 * len(best))
    ax = fig.add_subplot()
    names = [layer.model for layer in best][::-1]
    values = [100 * layer.accuracy for layer in best][::-1]
    bars = ax.barh(names, values, color="tab:blue")
    for bar, layer in zip(bars, best[::-1]):
        ax.text(bar.get_width() - 0.5, bar.get_y() + bar.get_height() / 2,
                f"{layer.layer}  {100 * layer.accuracy:.2f}%", ha="right", va="center", color="white",
                fontsize=9, fontweight="bold")
    low = min(values)
    ax.set_xlim(max(0.0, low - 10), 100)
    ax.set_xlabel("test accuracy of the best layer (%)")
    ax.set_title(f"Best layer per model on {report.dataset} ({_weights(report)})", fontsize=10)
    return fig


def _curve_figure(report: Report) -> Figure:
    """Test accuracy against training images per class: a line per layer, a panel per probe."""
    probes = [probe for probe in report.probes if any(probe in layer.curve for layer in report.layers)]
    fig = _figure(5.5 * len(probes) + 1.5, 4.8)
    axes = fig.subplots(1, len(probes), squeeze=False)[0]
    for ax, probe in zip(axes, probes):
        for k, layer in enumerate(layer for layer in report.layers if probe in layer.curve):
            points = layer.curve[probe]
            name = f"{layer.model} {layer.layer}" if report.multi_model else layer.layer
            ax.plot([p.train_per_class for p in points], [100 * p.accuracy for p in points], marker="o",
                    color=f"C{k % 10}", label=name)
        sizes = sorted({p.train_per_class for layer in report.layers for p in layer.curve.get(probe, [])})
        if sizes and sizes[-1] / sizes[0] >= 8:
            ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("training images per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(report.probe_title(probe), fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Learning curve: {', '.join(_models(report))} on {report.dataset} ({_weights(report)}; the "
                 "same test images for every size)", fontsize=10)
    return fig


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_dir: Path, stem: str, formats: tuple[str, ...]) -> list[Path]:
    paths = [out_dir / f"{stem}.{ext}" for ext in formats]
    for path in paths:
        fig.savefig(path, dpi=DPI, metadata={"Date": None} if path.suffix == ".svg" else None)
    return paths


def _models(report: Report) -> list[str]:
    """Names of the models with rows, in the table's order (one colour each)."""
    return list(dict.fromkeys(layer.model for layer in report.layers))


def _weights(report: Report) -> str:
    return "RANDOM weights" if report.weights_random else f"weights {report.weights}"


def _accuracy_text(layer: LayerReport) -> str:
    text = f"accuracy {100 * layer.accuracy:.1f}%"
    if layer.accuracy_std is not None:
        splits = len(layer.split_accuracies)
        text += f" \u00b1 {100 * layer.accuracy_std:.1f}%"
        text += f" (mean of {splits} splits)" if splits else ""
    return text


def _label_width(names: list[str], fontsize: float) -> float:
    """Inches taken by the longest of `names` at `fontsize` (a generous estimate)."""
    return max(len(name) for name in names) * fontsize * 0.62 / 72


def _accuracy_figure(report: Report) -> Figure:
    models = _models(report)
    entries = sorted(report.layers, key=lambda e: models.index(e.model))
    x = np.arange(len(entries)) + 0.6 * np.array([models.index(e.model) for e in entries])
    colors = [f"C{models.index(e.model) % 10}" for e in entries]
    names = [e.layer for e in entries]
    fig = _figure(max(7.0, 0.75 * len(entries) + 2.5),
                  8.5 + 0.5 * _label_width(names, 9) + 0.3 * (len(models) > 1))
    acc_ax, dim_ax, time_ax = fig.subplots(3, 1, sharex=True, height_ratios=[1.5, 1, 1])

    acc = np.array([100 * e.accuracy for e in entries])
    std = [e.accuracy_std for e in entries]
    bars = acc_ax.bar(x, acc, color=colors)
    with_std = [i for i, s in enumerate(std) if s is not None]
    if with_std:
        acc_ax.errorbar(x[with_std], acc[with_std], [100 * std[i] for i in with_std],
                        fmt="none", ecolor="black", capsize=4, label="\u00b11 std over splits")
    labels = [f"{a:.1f}" + (f"\n\u00b1{100 * s:.1f}" if s is not None else "")
              for a, s in zip(acc, std)]
    acc_ax.bar_label(bars, labels, label_type="center", fontsize=8, color="white",
                     fontweight="bold")
    chance = 100 / len(report.classes)
    acc_ax.axhline(chance, color="0.3", linestyle="--", linewidth=1,
                   label=f"chance ({chance:.1f}%)")
    acc_ax.set_ylim(0, 100)
    acc_ax.set_ylabel("Test accuracy (%)")
    handles = [Patch(color=f"C{i % 10}", label=m) for i, m in enumerate(models)]
    handles += acc_ax.get_legend_handles_labels()[0]
    acc_ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.01),
                  ncols=min(len(handles), 5), fontsize=8, frameon=False, borderaxespad=0)

    dims = [e.dim for e in entries]
    bars = dim_ax.bar(x, dims, color=colors)
    dim_ax.set_yscale("log")
    dim_ax.set_ylim(min(dims) / 2, max(dims) * 4)
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    dim_ax.yaxis.set_major_formatter(plain)
    few_decades = max(dims) / min(dims) < 100
    if few_decades:  # label 2x and 5x too
        dim_ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
    dim_ax.yaxis.set_minor_formatter(plain if few_decades else NullFormatter())
    dim_ax.bar_label(bars, [f"{d:,}" for d in dims], fontsize=7, padding=2)
    dim_ax.set_ylabel("Feature dimension\n(values per image, log scale)")

    feature = np.array([e.feature_seconds for e in entries], dtype=float)
    probe = report.probe_title(report.probes[0])
    train = np.array([e.train_seconds for e in entries], dtype=float)
    shared = [len(e.feature_shared_with) > 1 for e in entries]
    feat_bars = time_ax.bar(x - 0.2, feature, 0.4, color="0.55", label="feature extraction"
                            + (" (hatched: one pass shared by several layers)" if any(shared)
                               else ""))
    for bar, is_shared in zip(feat_bars, shared):
        bar.set_hatch("//" if is_shared else None)
    train_bars = time_ax.bar(x + 0.2, train, 0.4, color="0.2", label=f"{probe} training")
    for group in (feat_bars, train_bars):
        time_ax.bar_label(group, [f"{v:.3g}" for v in group.datavalues], fontsize=7,
                          padding=2, rotation=90)
    positive = np.concatenate([feature, train])
    positive = positive[positive > 0]
    if positive.size and positive.max() / positive.min() > 50:
        time_ax.set_yscale("log")
        time_ax.set_ylim(positive.min() / 2, positive.max() * 30)
        time_ax.set_ylabel("Time (s, log scale)")
    else:
        time_ax.set_ylim(0, max(positive.max() if positive.size else 1, 1e-3) * 1.35)
        time_ax.set_ylabel("Time (s)")
    time_ax.legend(fontsize=8, loc="upper left", ncols=2)
    time_ax.set_xticks(x, names, rotation=30, ha="right", rotation_mode="anchor")
    time_ax.set_xlabel("Layer" + (" (colour: model)" if len(models) > 1 else ""))
    for ax in (acc_ax, dim_ax, time_ax):
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    title = (f"{probe} per layer: {', '.join(models)} on {report.dataset} "
             f"({_weights(report)}, {len(report.classes)} classes)")
    width_chars = int(fig.get_figwidth() * 9)  # about 9 characters per inch at this font size
    fig.suptitle(textwrap.fill(title, width_chars),
                 color="darkred" if report.weights_random else "black")
    return fig


def _confusion_figure(report: Report, layer: LayerReport) -> Figure:
    classes = report.classes
    n = len(classes)
    counts = confusion_matrix(layer, n)
    share = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * n) if n <= ANNOTATE_MAX_CLASSES else min(0.3 * n, 24.0)
    fontsize = min(9.0, 0.6 * 72 * side / n)
    labels = _label_width(classes, fontsize)
    fig = _figure(side + labels + 2.2, side + 0.75 * labels + 1.2)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor",
                  fontsize=fontsize)
    ax.set_yticks(range(n), classes, fontsize=fontsize)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    if n <= ANNOTATE_MAX_CLASSES:
        for (i, j), value in np.ndenumerate(share):
            if counts[i, j]:
                ax.text(j, i, f"{value:.0f}", ha="center", va="center",
                        fontsize=8 if n <= 12 else 7, color="white" if value > 55 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="Share of the true class's test images (%)")
    ax.set_title(f"{layer.model} {layer.layer}: {_accuracy_text(layer)}\n"
                 f"rows normalised, {counts.sum()} test images", fontsize=10)
    return fig


def _per_class_figure(report: Report, layer: LayerReport) -> Figure:
    classes = report.classes
    n = len(classes)
    share = 100 * per_class_accuracy(layer, n)
    totals = confusion_matrix(layer, n).sum(axis=1)
    fontsize = 9 if n <= 40 else max(4.0, 360 / n)
    fig = _figure(6.5 + _label_width(classes, fontsize), 1.8 + n * fontsize * 2.4 / 72)
    ax = fig.subplots()
    y = np.arange(n)
    bars = ax.barh(y, np.nan_to_num(share), color="C0")
    ax.bar_label(bars, [f"{s:.1f}% of {t}" if t else "no test images"
                        for s, t in zip(share, totals)], fontsize=7, padding=3,
                 bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    ax.axvline(100 * layer.accuracy, color="darkred", linestyle="--", linewidth=1, zorder=1)
    ax.set_yticks(y, classes, fontsize=fontsize)
    ax.set_ylim(n - 0.4, -0.6)
    ax.set_xlim(0, 125)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("Test accuracy of the class (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"Per-class accuracy: {layer.model} {layer.layer}\n"
                 f"dashed line: overall {_accuracy_text(layer)}", fontsize=10)
    return fig
