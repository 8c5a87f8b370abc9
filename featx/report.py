"""Tables of a study: Markdown, CSV and JSON, from one report dictionary.

The JSON holds everything the table is made of (per-layer predictions on the test images, the
split, the settings and versions), so any figure in it can be recomputed without the model.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

COLUMNS = ("Layer", "Accuracy", "Feature Dim", "Feature Time", "SVM Train Time", "C")


def _accuracy_text(layer: dict) -> str:
    if layer.get("accuracy_std") is not None:
        return f"{layer['accuracy']:.4f} +/- {layer['accuracy_std']:.4f}"
    return f"{layer['accuracy']:.4f}"


def table_rows(report: dict) -> list[dict[str, str]]:
    """One row per layer with the columns of COLUMNS, formatted for people."""
    rows = []
    for layer in report["layers"]:
        shared = len(layer["feature_shared_with"]) > 1
        rows.append({
            **({"Model": layer["model"]} if report.get("multi_model") else {}),
            "Layer": layer["layer"],
            "Accuracy": _accuracy_text(layer),
            "Feature Dim": str(layer["dim"]),
            "Feature Time": f"{layer['feature_seconds']:.2f} s" + ("*" if shared else ""),
            "SVM Train Time": f"{layer['svm_seconds']:.2f} s",
            "C": f"{layer['C']:g}",
        })
    return rows


def notes(report: dict) -> list[str]:
    """Lines that must travel with the table: random weights, shared passes, split, skips."""
    lines = []
    if report.get("weights_random"):
        lines.append(f"Weights: RANDOM ({report['weights_id']}), not pretrained: a baseline only.")
    else:
        lines.append(f"Weights: {report['weights_id']}.")
    shared = {tuple(layer["feature_shared_with"]) for layer in report["layers"]
              if len(layer["feature_shared_with"]) > 1}
    for group in sorted(shared):
        lines.append(f"* Feature Time is one extraction pass shared by {', '.join(group)}.")
    splits = max((len(layer.get("split_accuracies", [])) for layer in report["layers"]), default=0)
    if splits > 1:
        lines.append(f"Accuracy: mean +/- standard deviation over {splits} splits; "
                     "SVM Train Time: mean per split.")
    how_c = "chosen by cross-validation on the training part" if report["C_option"] == "auto" else "fixed"
    lines.append(f"Split: {report['split']}. Scaling: {report['scaling']}. C: {how_c}.")
    if report.get("skipped"):
        lines.append(f"Skipped {len(report['skipped'])} unreadable images: "
                     + ", ".join(sorted(report["skipped"])[:10])
                     + (" ..." if len(report["skipped"]) > 10 else ""))
    return lines


def render_markdown(report: dict) -> str:
    rows = table_rows(report)
    header = list(rows[0]) if rows else list(COLUMNS)
    lines = [f"{report['title']}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines + [""] + notes(report)) + "\n"


def render_csv(report: dict) -> str:
    buffer = io.StringIO()
    rows = table_rows(report)
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def merge_reports(reports: list[dict]) -> dict:
    """One report for several models on the same dataset: a Model column, each model's
    weights, preprocessing, cache and extraction runs kept under "models"."""
    per_model = ("model", "weights_id", "weights_random", "weights_checksum", "preprocess",
                 "cache", "extraction_runs")
    merged = dict(reports[0])
    names = [r["model"] for r in reports]
    merged.update(
        multi_model=True, title=f"{', '.join(names)} on {merged['dataset']}",
        model=", ".join(names), weights_id="; ".join(r["weights_id"] for r in reports),
        weights_random=any(r["weights_random"] for r in reports),
        models=[{key: r[key] for key in per_model} for r in reports],
        skipped={path: why for r in reports for path, why in r["skipped"].items()},
        layers=[entry for r in reports for entry in r["layers"]])
    return merged


def write_table(report: dict, out_dir: Path, stem: str = "table") -> dict[str, Path]:
    """Write <stem>.md, <stem>.csv and <stem>.json; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "json")}
    paths["md"].write_text(render_markdown(report))
    paths["csv"].write_text(render_csv(report))
    paths["json"].write_text(json.dumps(report, indent=1))
    return paths


def load_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())
