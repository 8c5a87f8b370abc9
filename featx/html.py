"""One self-contained HTML page of a study report: the layer table and its notes, the plots as
PNG data URIs, the settings and the skipped images. The page loads nothing from elsewhere."""

from __future__ import annotations

import base64
import tempfile
from html import escape
from pathlib import Path

from featx.report import notes, table_rows

CSS = """
body { font-family: sans-serif; max-width: 1200px; margin: 1.5em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.best td { font-weight: bold; }
.warn { background: #fde8e8; border: 1px solid #c33; color: #900; padding: 0.5em 0.8em; }
.meta, .notes { color: #555; }
img { max-width: 100%; height: auto; }
.pair { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.pair img { max-width: calc(50% - 0.5em); min-width: 420px; }
"""


def write_html(report: dict, path: Path, plots: dict[str, list[Path]] | None = None) -> Path:
    """Write the report as one HTML file; `plots` as returned by `featx.plots.write_plots`
    (drawn into a temporary folder when None, which needs matplotlib)."""
    path = Path(path)
    if plots is None:
        from featx.plots import write_plots  # matplotlib is only needed to draw

        with tempfile.TemporaryDirectory() as tmp:
            page = render_html(report, png_data_uris(write_plots(report, Path(tmp))))
    else:
        page = render_html(report, png_data_uris(plots))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def png_data_uris(plots: dict[str, list[Path]]) -> dict[str, str]:
    """{stem: data:image/png;base64,... URI} of the PNG files among `plots`."""
    return {stem: "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
            for stem, paths in plots.items() for png in paths if Path(png).suffix == ".png"}


def render_html(report: dict, images: dict[str, str]) -> str:
    """The page as a string; `images` maps plot stems to data URIs (missing ones are left out)."""
    parts = [f"<h1>{escape(report['title'])}</h1>"]
    if report.get("weights_random"):
        parts.append(f'<p class="warn"><strong>RANDOM weights</strong> '
                     f"({escape(str(report['weights_id']))}): the network is not pretrained; "
                     "these accuracies are a baseline only.</p>")
    parts.append(f'<p class="meta">Dataset {escape(report["dataset"])}, '
                 f"{len(report['classes'])} classes; created {escape(str(report.get('created')))}"
                 f" by featx {escape(str(report.get('featx_version')))}.</p>")
    parts += ["<h2>Layers</h2>", _layer_table(report), '<ul class="notes">']
    parts += [f"<li>{escape(line)}</li>" for line in notes(report)]
    parts.append("</ul>")
    if "accuracy" in images:
        parts += ["<h2>Accuracy, feature dimension and time per layer</h2>",
                  _img(images["accuracy"], "accuracy, feature dimension and time per layer")]
    parts += [_layer_section(report, entry, images) for entry in report["layers"]]
    parts += ["<h2>Settings</h2>", _settings(report), "<h2>Skipped images</h2>",
              _skipped(report.get("skipped") or {})]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(report['title'])}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{escape(alt)}">'


def _text(value: object) -> str:
    """Settings value -> plain text: dicts as key=value, sequences comma-joined."""
    if isinstance(value, dict):
        return ", ".join(f"{k}=[{_text(v)}]" if isinstance(v, (list, tuple)) else f"{k}={_text(v)}"
                         for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]], css: str = "",
           row_css: list[str] | None = None) -> str:
    lines = [f'<table class="{css}">' if css else "<table>",
             "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        attr = f' class="{row_css[i]}"' if row_css and row_css[i] else ""
        lines.append(f"<tr{attr}>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>")
    return "\n".join(lines + ["</table>"])


def _layer_table(report: dict) -> str:
    rows = table_rows(report)
    if not rows:
        return "<p>No layers were evaluated.</p>"
    best = max(layer["accuracy"] for layer in report["layers"])
    marks = ["best" if layer["accuracy"] == best else "" for layer in report["layers"]]
    return _table(list(rows[0]), [list(row.values()) for row in rows], "layers", marks)


def _layer_section(report: dict, entry: dict, images: dict[str, str]) -> str:
    name = f"{entry['model']} {entry['layer']}"
    accuracy = f"{100 * entry['accuracy']:.2f}%"
    if entry.get("accuracy_std") is not None:
        accuracy += f" \u00b1 {100 * entry['accuracy_std']:.2f}%"
    facts = [f"{entry.get('n_train', '?')} training and {entry.get('n_test', '?')} test images",
             f"C {entry['C']:g}", f"scaling {entry.get('scaling', report.get('scaling'))}"]
    if entry.get("cv_scores"):
        facts.append("cross-validation accuracy by C: " + ", ".join(
            f"{c}: {score:.3f}" for c, score in entry["cv_scores"].items()))
    if entry.get("split_accuracies"):
        facts.append("accuracy per split: "
                     + ", ".join(f"{a:.4f}" for a in entry["split_accuracies"]))
    parts = [f"<h2>{escape(name)}: {escape(accuracy)}</h2>",
             f"<p>{escape('; '.join(facts))}.</p>"]
    if entry.get("converged") is False:
        parts.append('<p class="warn">The SVM solver did not converge for this layer.</p>')
    if images:
        from featx.plots import plot_stem  # the names write_plots gave

        pair = [_img(images[stem], f"{kind} of {name}") for kind, stem in
                (("confusion matrix", plot_stem("confusion", entry)),
                 ("per-class accuracy", plot_stem("per_class", entry))) if stem in images]
        parts.append('<div class="pair">' + "".join(pair) + "</div>")
    return "\n".join(parts)


def _settings(report: dict) -> str:
    models = list(dict.fromkeys(layer["model"] for layer in report["layers"])) or [
        report.get("model")]
    weights = report.get("weights_id")
    if report.get("weights_random"):
        weights = f"RANDOM ({weights}), not pretrained"
    fields = [("Model" + ("s" if len(models) > 1 else ""), models), ("Weights", weights),
              ("Weights checksum", report.get("weights_checksum")),
              ("Preprocessing", report.get("preprocess")),
              ("Dataset", report.get("dataset")), ("Dataset root", report.get("dataset_root")),
              ("Classes", report.get("classes")), ("Split", report.get("split")),
              ("Seed", report.get("seed")), ("Training images per class",
                                              report.get("train_per_class")),
              ("Split file", report.get("split_file")), ("Scaling", report.get("scaling")),
              ("C option", report.get("C_option")), ("Feature cache", report.get("cache"))]
    parts = [_table(["Setting", "Value"], [[name, _text(value)] for name, value in fields])]
    runs = report.get("extraction_runs") or []
    parts.append("<h3>Extraction runs</h3>")
    if runs:
        keys = list(dict.fromkeys(key for run in runs for key in run))
        parts.append(_table(keys, [[_text(run.get(key)) for key in keys] for run in runs]))
    else:
        parts.append("<p>none recorded</p>")
    parts += ["<h3>Versions</h3>", _table(["Package", "Version"], [
        [name, _text(version)] for name, version in (report.get("versions") or {}).items()])]
    return "\n".join(parts)


def _skipped(skipped: dict[str, str]) -> str:
    if not skipped:
        return "<p>none</p>"
    items = [f"<li>{escape(path)}: {escape(str(reason))}</li>"
             for path, reason in sorted(skipped.items())]
    return f"<p>{len(skipped)} unreadable images were left out:</p>\n<ul>\n" + "\n".join(
        items) + "\n</ul>"
