"""The study's report as a value, and its tables: Markdown, CSV and JSON.

The JSON holds everything the table is made of (per-layer predictions on the test images, the
split, the settings and versions), so any figure in it can be recomputed without the model;
`Report.from_dict` reads it back for `featx plot` and `featx report`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from featx.data.images import shown
from featx.errors import FeatxError
from featx.probes import ProbeResult

COLUMNS = ("Layer", "Accuracy", "Balanced", "Feature Dim", "Feature Time", "Train Time", "C")


@dataclass
class ProbeScore:
    """A further probe's figures on a layer, beside the first probe's (`--probe svm,logreg,knn`):
    means over splits when there are several."""

    probe: str
    accuracy: float
    balanced_accuracy: float
    C: float | None
    train_seconds: float
    accuracy_std: float | None = None
    C_per_split: list[float] = field(default_factory=list)
    converged: bool = True  # the solver met its tolerance on every split (reports before: unknown)
    C_edge: str = ""  # cross-validation chose C at this end of its grid (on a split at least)
    solver: str = ""  # the solver that fitted it (svm: torch or liblinear)

    @classmethod
    def from_results(cls, results: list[ProbeResult]) -> ProbeScore:
        several = len(results) > 1
        return cls(probe=results[0].probe, accuracy=float(np.mean([r.accuracy for r in results])),
                   balanced_accuracy=float(np.mean([r.balanced_accuracy for r in results])),
                   C=results[0].C, train_seconds=float(np.mean([r.train_seconds for r in results])),
                   accuracy_std=float(np.std([r.accuracy for r in results])) if several else None,
                   C_per_split=[r.C for r in results] if several else [],
                   converged=all(r.converged for r in results), solver=results[0].solver,
                   C_edge=next((r.C_edge for r in results if r.C_edge), ""))


@dataclass
class CurvePoint:
    """One point of a layer's learning curve for one probe: its accuracy when trained on
    `train_per_class` images of each class (means over splits when there are several)."""

    train_per_class: int
    accuracy: float
    balanced_accuracy: float
    train_seconds: float
    splits: int = 1

    @classmethod
    def from_results(cls, size: int, results: list[ProbeResult]) -> CurvePoint:
        return cls(size, float(np.mean([r.accuracy for r in results])),
                   float(np.mean([r.balanced_accuracy for r in results])),
                   float(np.mean([r.train_seconds for r in results])), len(results))


@dataclass
class LayerReport(ProbeResult):
    """One layer of one model in the table: the probe's result (the mean over splits when there
    are several, with every split's accuracy and C), whose features they are and the extraction
    time they share."""

    model: str = ""
    weights: str = ""
    feature_seconds: float = 0.0
    feature_shared_with: list[str] = field(default_factory=list)
    accuracy_std: float | None = None
    split_accuracies: list[float] = field(default_factory=list)
    C_per_split: list[float] = field(default_factory=list)
    other_probes: list[ProbeScore] = field(default_factory=list)

    confusion: list[list[int]] = field(default_factory=list)  # counts: rows true, columns predicted
    curve: dict[str, list[CurvePoint]] = field(default_factory=dict)  # probe -> learning curve points

    @classmethod
    def from_results(cls, results: list[ProbeResult], model: str, weights: str,
                     *, feature_seconds: float, shared: list[str], n_classes: int) -> LayerReport:
        """One entry for a layer: the mean (and spread) over splits, the predictions of all splits
        in memory and their confusion matrix (which the JSON keeps: its size is the classes', not
        the test images')."""
        first = {f.name: getattr(results[0], f.name) for f in fields(ProbeResult)}
        entry = cls(model=model, weights=weights, feature_seconds=feature_seconds,
                    feature_shared_with=shared,
                    **{**first, **{name: _joined([getattr(r, name) for r in results]) for name in PER_IMAGE}})
        entry.confusion = confusion_counts(entry.y_true, entry.y_pred, n_classes).tolist()
        if len(results) > 1:
            accuracies = [r.accuracy for r in results]
            entry.accuracy = float(np.mean(accuracies))
            entry.accuracy_std = float(np.std(accuracies))
            entry.balanced_accuracy = float(np.mean([r.balanced_accuracy for r in results]))
            entry.split_accuracies = accuracies
            entry.train_seconds = float(np.mean([r.train_seconds for r in results]))
            entry.C_per_split = [r.C for r in results]
            entry.converged = all(r.converged for r in results)
            entry.C_edge = next((r.C_edge for r in results if r.C_edge), "")
        return entry

    def to_dict(self) -> dict:
        """As the JSON holds it: the scores, settings and confusion matrix; not the per-image
        predictions (those are in <layer>.predictions.csv, written as they stream)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PER_IMAGE}
        return {**data, "other_probes": [asdict(score) for score in self.other_probes],
                "curve": {probe: [asdict(p) for p in points] for probe, points in self.curve.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> LayerReport:
        data = {("train_seconds" if k == "svm_seconds" else k): v for k, v in data.items()}
        names = {f.name for f in fields(cls)} - {"test_rows"}
        entry = cls(**{k: v for k, v in data.items() if k in names})  # featx 0.1: y_true and y_pred too
        entry.other_probes = [ProbeScore(**p) for p in data.get("other_probes", [])]
        entry.curve = {probe: [CurvePoint(**p) for p in points] for probe, points in data.get("curve",
                                                                                              {}).items()}
        return entry


PER_IMAGE = ("y_true", "y_pred", "test_rows")  # in memory only: they grow with the test images
PREDICTION_ROWS = 65536  # test images per block of <layer>.predictions.csv


def write_predictions(path: Path, results: dict[str, list[ProbeResult]], classes: Sequence[str],
                      paths_of: Callable[[np.ndarray], list[str]]) -> None:
    """<layer>.predictions.csv: per split and test image, its path (as reports show it), true class
    and each probe's prediction; written a block of images at a time, whatever the test set's size."""
    probes = list(results)
    names = np.asarray(classes, dtype=object)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "path", "true", *probes])
        for k, first in enumerate(results[probes[0]]):
            for start in range(0, len(first.test_rows), PREDICTION_ROWS):
                part = slice(start, start + PREDICTION_ROWS)
                columns = [names[first.y_true[part]], *(names[results[p][k].y_pred[part]] for p in probes)]
                paths = [shown(name) for name in paths_of(first.test_rows[part])]
                writer.writerows(zip([k] * len(paths), paths, *columns))


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The splits' arrays end to end (one split: the array itself, not a copy)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (n_classes, n_classes) of test predictions: rows true, columns predicted (counted
    a block of PREDICTION_ROWS at a time)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} true labels but {y_pred.size} predictions")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n_classes):
        raise ValueError(f"labels outside 0..{n_classes - 1}")
    counts = np.zeros(n_classes * n_classes, dtype=np.int64)
    for start in range(0, y_true.size, PREDICTION_ROWS):
        part = slice(start, start + PREDICTION_ROWS)
        counts += np.bincount(y_true[part].astype(np.int64) * n_classes + y_pred[part],
                              minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


@dataclass
class ModelIdentity:
    """What a model's rows were computed with: its weights, their checksum and preprocessing,
    the cache they came from and the extraction runs that filled it."""

    model: str
    weights: str
    weights_random: bool
    weights_checksum: str
    preprocess: dict
    cache: str
    extraction_runs: list[dict] = field(default_factory=list)


@dataclass
class Report:
    """Everything a table, a figure and the HTML page are made of."""

    title: str
    dataset: str
    dataset_root: str
    classes: list[str]
    models: list[ModelIdentity]
    layers: list[LayerReport]
    split: str
    seed: int
    train_per_class: int | None
    split_file: str | None
    splits: int
    scaling: str
    C_option: str
    train_sizes: list[int] = field(default_factory=list)  # a learning curve's sizes, when asked for
    probes: list[str] = field(default_factory=lambda: ["svm"])
    solver: str = "auto"
    probe_info: dict[str, dict] = field(default_factory=dict)  # name -> title, summary, chooses_C
    probe_params: dict[str, dict[str, float]] = field(default_factory=dict)
    featx_version: str = ""
    created: str = ""
    skipped: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def multi_model(self) -> bool:
        return len(self.models) > 1

    @property
    def weights_random(self) -> bool:
        return any(m.weights_random for m in self.models)

    @property
    def weights(self) -> str:
        return "; ".join(m.weights for m in self.models)

    def probe_title(self, probe: str) -> str:
        """What figures and the page call a probe: its registered title (its name in reports
        written before titles were kept)."""
        return self.probe_info.get(probe, {}).get("title", _OLD_TITLES.get(probe, probe))

    def unconverged_text(self, probe: str) -> str:
        default = "its solver stopped short of its tolerance, at its step limit or the float precision"
        return self.probe_info.get(probe, {}).get("unconverged", default)

    def chooses_C(self, probe: str) -> bool:
        return self.probe_info.get(probe, {}).get("chooses_C", probe != "knn")

    @property
    def best(self) -> LayerReport | None:
        return max(self.layers, key=lambda layer: layer.accuracy, default=None)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "models": [asdict(m) for m in self.models],
                "layers": [layer.to_dict() for layer in self.layers], "multi_model": self.multi_model,
                "weights": self.weights, "weights_random": self.weights_random}

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        try:
            values["models"] = [ModelIdentity(**m) for m in data["models"]]
            values["layers"] = [LayerReport.from_dict(layer) for layer in data["layers"]]
            return cls(**values)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a featx report ({exc})") from None

    @classmethod
    def merge(cls, reports: list[Report]) -> Report:
        """One report for several models on the same dataset: a Model column in the table."""
        first = reports[0]
        names = ", ".join(m.model for r in reports for m in r.models)
        return cls(**{**{f.name: getattr(first, f.name) for f in fields(cls)},
                      "title": f"{names} on {first.dataset}",
                      "models": [m for r in reports for m in r.models],
                      "layers": [layer for r in reports for layer in r.layers],
                      "skipped": {p: why for r in reports for p, why in r.skipped.items()}})


def _accuracy_text(layer: LayerReport | ProbeScore) -> str:
    if layer.accuracy_std is not None:
        return f"{layer.accuracy:.4f} +/- {layer.accuracy_std:.4f}"
    return f"{layer.accuracy:.4f}"


def _C_text(layer: LayerReport | ProbeScore) -> str:
    if layer.C is None:  # a probe without C (knn)
        return "-"
    if not layer.C_per_split or len(set(layer.C_per_split)) == 1:
        return f"{layer.C:g}"
    return "/".join(f"{c:g}" for c in layer.C_per_split)


def table_rows(report: Report) -> list[dict[str, str]]:
    """One row per layer with the columns of COLUMNS, formatted for people; with several probes,
    accuracy, balanced accuracy, time and C per probe, the first probe's columns first."""
    rows = []
    several = len(report.probes) > 1
    for layer in report.layers:
        shared = len(layer.feature_shared_with) > 1
        row = {**({"Model": layer.model} if report.multi_model else {}), "Layer": layer.layer}
        for score in [layer, *layer.other_probes]:
            name = f"{score.probe} " if several else ""
            row[f"{name}Accuracy"] = _accuracy_text(score)
            row[f"{name}Balanced"] = f"{score.balanced_accuracy:.4f}"
        row["Feature Dim"] = str(layer.dim)
        row["Feature Time"] = f"{layer.feature_seconds:.2f} s" + ("*" if shared else "")
        for score in [layer, *layer.other_probes]:
            row[f"{score.probe} Train Time" if several else "Train Time"] = f"{score.train_seconds:.2f} s"
        for score in [layer, *layer.other_probes]:
            if report.chooses_C(score.probe) or not several:
                row[f"{score.probe} C" if several else "C"] = _C_text(score)
        rows.append(row)
    return rows


_OLD_TITLES = {"svm": "Linear SVM", "logreg": "Logistic regression", "knn": "k-NN"}  # reports before titles


def _probe_text(report: Report, probe: str) -> str:
    summary = report.probe_info.get(probe, {}).get("summary")
    params = report.probe_params.get(probe)
    settings = f" ({', '.join(f'{k} {v:g}' for k, v in params.items())})" if params else ""
    return f"{probe}, {summary}{settings}" if summary else probe


def notes(report: Report) -> list[str]:
    """Lines that must travel with the table: weights, best layer, shared passes, split, skips."""
    lines = []
    for m in report.models:
        if m.weights_random:
            lines.append(f"Weights: RANDOM ({m.weights}), not pretrained: a baseline only.")
        else:
            lines.append(f"Weights: {m.weights}.")
    best = report.best
    if best and len(report.layers) > 1:
        runner_up = max((layer.accuracy for layer in report.layers if layer is not best), default=None)
        where = f"{best.model} {best.layer}" if report.multi_model else best.layer
        lines.append(f"Best{f' ({best.probe})' if len(report.probes) > 1 else ''}: {where} at "
                     f"{best.accuracy:.4f}, "
                     f"{100 * (best.accuracy - runner_up):.2f} points above the next layer.")
    if report.multi_model:
        per_model = [max((layer for layer in report.layers if layer.model == m.model),
                         key=lambda layer: layer.accuracy) for m in report.models]
        lines.append("Best layer per model: " + "; ".join(f"{layer.model} {layer.layer} {layer.accuracy:.4f}"
                                                          for layer in per_model) + ".")
    shared = {tuple(layer.feature_shared_with) for layer in report.layers
              if len(layer.feature_shared_with) > 1}
    for group in sorted(shared):
        lines.append(f"* Feature Time is one extraction pass shared by {', '.join(group)}.")
    splits = max((len(layer.split_accuracies) for layer in report.layers), default=0)
    if splits > 1:
        lines.append(f"Accuracy: mean +/- standard deviation over {splits} splits; "
                     "Train Time: mean per split; C: per split where they differ.")
    how_c = "chosen by cross-validation on the training part" if report.C_option == "auto" else "fixed"
    lines.append(f"Split: {report.split}. Scaling: {report.scaling}. C: {how_c}.")
    lines.append("Balanced: mean per-class recall. Probes: "
                 + "; ".join(_probe_text(report, p) for p in report.probes) + ".")
    solvers = _solver_text(report)
    if solvers:
        how = "auto, the faster by featx's cost model per layer" if report.solver == "auto" else report.solver
        lines.append(f"Solver ({how}): {solvers}.")
    for probe in report.probes:
        unconverged = [f"{f'{layer.model} ' if report.multi_model else ''}{layer.layer}"
                       for layer in report.layers for score in [layer, *layer.other_probes]
                       if score.probe == probe and not score.converged]
        if unconverged:
            lines.append(f"Not converged ({probe}: {report.unconverged_text(probe)}; rounding can still move "
                         "these accuracies): " + ", ".join(unconverged) + ".")
    drawn = {p.train_per_class for layer in report.layers for points in layer.curve.values() for p in points}
    if report.train_sizes and set(report.train_sizes) - drawn:
        lines.append("Learning curve: no point at " + ", ".join(map(str,
                                                                    sorted(set(report.train_sizes) - drawn)))
                     + " training images per class (a class has no more training images than that).")
    edges = [f"{f'{layer.model} ' if report.multi_model else ''}{layer.layer} {score.probe} "
             f"(C {score.C:g}, the {score.C_edge} of the grid)"
             for layer in report.layers for score in [layer, *layer.other_probes] if score.C_edge]
    if edges:
        lines.append("C chosen at an end of the grid cross-validation searched, so a C beyond it might score "
                     "higher (give one with --C): " + ", ".join(edges) + ".")
    if report.skipped:
        lines.append(f"Skipped {len(report.skipped)} unreadable images: "
                     + ", ".join(shown(path) for path in sorted(report.skipped)[:10])
                     + (" ..." if len(report.skipped) > 10 else ""))
    return lines


def markdown_text(text: str) -> str:
    """A name as Markdown shows it literally: no live HTML, no link, no broken table cell."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("[", "\\[").replace("]", "\\]").replace("|", "\\|")


def curve_rows(report: Report) -> list[dict[str, str]]:
    """The learning curve as rows: per layer (and probe, with several), the accuracy at each
    number of training images per class."""
    sizes = sorted({p.train_per_class for layer in report.layers for points in layer.curve.values()
                    for p in points})
    rows = []
    for layer in report.layers:
        for probe, points in layer.curve.items():
            row = {**({"Model": layer.model} if report.multi_model else {}), "Layer": layer.layer,
                   **({"Probe": probe} if len(report.probes) > 1 else {})}
            at = {p.train_per_class: p for p in points}
            row.update({f"{k} per class": f"{at[k].accuracy:.4f}" if k in at else "-" for k in sizes})
            rows.append(row)
    return rows


def _markdown_table(rows: list[dict[str, str]]) -> list[str]:
    header = list(rows[0])
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(markdown_text(row[h]) for h in header) + " |" for row in rows])


def _solver_text(report: Report) -> str:
    """Which solver fitted which layers, per probe: `svm: liblinear on a, b; torch on c`, or
    `logreg: torch` where one solver fitted every layer; empty for reports before solvers were kept."""
    used: dict[str, dict[str, list[str]]] = {}
    for layer in report.layers:
        for score in [layer, *layer.other_probes]:
            if score.solver:
                where = f"{layer.model} {layer.layer}" if report.multi_model else layer.layer
                used.setdefault(score.probe, {}).setdefault(score.solver, []).append(where)
    return ". ".join(f"{probe}: " + (next(iter(by)) if len(by) == 1 else "; ".join(
        f"{solver} on {', '.join(layers)}" for solver, layers in by.items())) for probe, by in used.items())


def render_markdown(report: Report) -> str:
    rows = table_rows(report)
    lines = [markdown_text(report.title), ""]
    lines += _markdown_table(rows) if rows else ["| " + " | ".join(COLUMNS) + " |"]
    curve = curve_rows(report)
    if curve:
        lines += ["", "Learning curve (test accuracy by training images per class, the same test images "
                  "for every size):", ""] + _markdown_table(curve)
    return "\n".join(lines + [""] + [markdown_text(line) for line in notes(report)]) + "\n"


def render_curve_csv(report: Report) -> str:
    buffer = io.StringIO()
    rows = curve_rows(report)
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    rows = table_rows(report)
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_table(report: Report, out_dir: Path, stem: str = "table") -> dict[str, Path]:
    """Write <stem>.md, <stem>.csv and <stem>.json (and <stem>_curve.csv with a learning curve);
    return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "json")}
    paths["md"].write_text(render_markdown(report))
    paths["csv"].write_text(render_csv(report))
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1))
    if curve_rows(report):
        paths["curve"] = out_dir / f"{stem}_curve.csv"
        paths["curve"].write_text(render_curve_csv(report))
    return paths


def load_report(path: Path) -> Report:
    """A report JSON written by featx; anything else is a FeatxError naming the file."""
    path = Path(path)
    try:
        return Report.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise FeatxError(f"{path} is not a featx report JSON: {exc}") from None
