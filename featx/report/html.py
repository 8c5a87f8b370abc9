"""One self-contained HTML page of a study report: the layer table and its notes, the plots as
PNG data URIs, the settings and the skipped images. The page loads nothing from elsewhere."""

from __future__ import annotations

import base64
import tempfile
from html import escape
from pathlib import Path

from featx.data.images import shown
from featx.report.tables import LayerReport, Report, curve_rows, notes, table_rows

CSS = """
body { font-family: sans-serif; max-width: 1200px; margin: 1.5em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
.scroll { max-width: 100%; overflow-x: auto; margin: 0.5em 0; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.best td, p.best { font-weight: bold; }
.warn { background: #fde8e8; border: 1px solid #c33; color: #900; padding: 0.5em 0.8em; }
.meta, .notes { color: #555; }
img { max-width: 100%; height: auto; }
.pair { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.pair img { max-width: calc(50% - 0.5em); min-width: 420px; }
"""


def write_html(report: Report, path: Path, plots: dict[str, list[Path]] | None = None,
               *, extra: dict[str, list[Path]] | None = None) -> Path:
    """Write the report as one HTML file; `plots` as returned by `featx.report.plots.write_plots`
    (drawn into a temporary folder when None, which needs matplotlib), `extra` figures made
    elsewhere (the layer similarity heatmap)."""
    path = Path(path)
    if plots is None:
        from featx.report.plots import write_plots  # matplotlib is only needed to draw

        with tempfile.TemporaryDirectory() as tmp:
            drawn = {**write_plots(report, Path(tmp)), **(extra or {})}
            page = render_html(report, png_data_uris(drawn))
    else:
        page = render_html(report, png_data_uris({**plots, **(extra or {})}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def png_data_uris(plots: dict[str, list[Path]]) -> dict[str, str]:
    """{stem: data:image/png;base64,... URI} of the PNG files among `plots`."""
    return {stem: "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
            for stem, paths in plots.items() for png in paths if Path(png).suffix == ".png"}


def render_html(report: Report, images: dict[str, str]) -> str:
    """The page as a string; `images` maps plot stems to data URIs (missing ones are left out)."""
    parts = [f"<h1>{escape(report.title)}</h1>"]
    if report.weights_random:
        random = "; ".join(m.weights for m in report.models if m.weights_random)
        parts.append(f'<p class="warn"><strong>RANDOM weights</strong> '
                     f"({escape(random)}): the network is not pretrained; "
                     "these accuracies are a baseline only.</p>")
    parts.append(f'<p class="meta">Dataset {escape(report.dataset)}, '
                 f"{len(report.classes)} classes; created {escape(report.created)}"
                 f" by featx {escape(report.featx_version)}.</p>")
    parts += ["<h2>Layers</h2>", _best(report), _layer_table(report), '<ul class="notes">']
    parts += [f"<li>{escape(line)}</li>" for line in notes(report)
              if not line.startswith("Best:")]  # the best layer has its own line above the table
    parts.append("</ul>")
    if "accuracy" in images:
        parts += ["<h2>Accuracy, feature dimension and time per layer</h2>",
                  _img(images["accuracy"], "accuracy, feature dimension and time per layer")]
    if curve_rows(report):
        rows = curve_rows(report)
        parts += ["<h2>Learning curve</h2>", *([_img(images["learning_curve"], "learning curve")]
                                              if "learning_curve" in images else []),
                  _table(list(rows[0]), [list(row.values()) for row in rows])]
    if "best_per_model" in images:
        parts += ["<h2>Best layer per model</h2>", _img(images["best_per_model"], "best layer per model")]
    if "similarity" in images:  # written by featx similarity into the same folder
        parts += ["<h2>What the layers share (linear CKA)</h2>",
                  _img(images["similarity"], "linear CKA between every pair of layers")]
    parts += [_layer_section(report, layer, images) for layer in report.layers]
    parts += ["<h2>Settings</h2>", _settings(report), "<h2>Skipped images</h2>",
              _skipped(report.skipped)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(report.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
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
           *, row_css: list[str] | None = None) -> str:
    lines = ['<div class="scroll">', f'<table class="{css}">' if css else "<table>",
             "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        attr = f' class="{row_css[i]}"' if row_css and row_css[i] else ""
        lines.append(f"<tr{attr}>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>")
    return "\n".join(lines + ["</table>", "</div>"])


def _name(layer: LayerReport) -> str:
    return f"{layer.model} {layer.layer}"


def _best(report: Report) -> str:
    """A line naming the best layer and its lead over the next best ('' without layers)."""
    best = report.best
    if best is None:
        return ""
    text = f"Best layer: {_name(best)} at {100 * best.accuracy:.2f}% test accuracy"
    runner_up = max((layer for layer in report.layers if layer is not best),
                    key=lambda layer: layer.accuracy, default=None)
    if runner_up is not None:
        text += (f", {100 * (best.accuracy - runner_up.accuracy):.2f} points above the next best, "
                 f"{_name(runner_up)} at {100 * runner_up.accuracy:.2f}%")
    return f'<p class="best">{escape(text)}.</p>'


def _layer_table(report: Report) -> str:
    rows = table_rows(report)
    if not rows:
        return "<p>No layers were evaluated.</p>"
    best = report.best
    marks = ["best" if layer.accuracy == best.accuracy else "" for layer in report.layers]
    return _table(list(rows[0]), [list(row.values()) for row in rows], "layers", row_css=marks)


def _layer_section(report: Report, layer: LayerReport, images: dict[str, str]) -> str:
    name = _name(layer)
    accuracy = f"{100 * layer.accuracy:.2f}%"
    if layer.accuracy_std is not None:
        accuracy += f" \u00b1 {100 * layer.accuracy_std:.2f}%"
    facts = [f"{layer.probe}", f"balanced accuracy {100 * layer.balanced_accuracy:.2f}%",
             f"{layer.n_train} training and {layer.n_test} test images",
             *([f"C {layer.C:g}"] if layer.C is not None else []), f"scaling {layer.scaling}"]
    facts += [f"{other.probe}: accuracy {100 * other.accuracy:.2f}%, balanced "
              f"{100 * other.balanced_accuracy:.2f}%" + (f", C {other.C:g}" if other.C is not None else "")
              for other in layer.other_probes]
    if layer.cv_scores:
        facts.append("cross-validation accuracy by C: " + ", ".join(
            f"{c}: {score:.3f}" for c, score in layer.cv_scores.items()))
    if layer.split_accuracies:
        facts.append("accuracy per split: " + ", ".join(f"{a:.4f}" for a in layer.split_accuracies))
    parts = [f"<h2>{escape(name)}: {escape(accuracy)}</h2>",
             f"<p>{escape('; '.join(facts))}.</p>"]
    for score in [layer, *layer.other_probes]:
        if not score.converged:
            parts.append(f'<p class="warn">The {escape(score.probe)} probe did not converge on this '
                         f"layer: {escape(report.unconverged_text(score.probe))}.</p>")
        if score.C_edge:
            parts.append(f'<p class="warn">Cross-validation chose the {escape(score.probe)} probe\'s C '
                         f"at the {escape(score.C_edge)} of its grid ({score.C:g}): a C beyond it might "
                         "score higher.</p>")
    if images:
        from featx.report.plots import plot_stem  # the names write_plots gave

        pair = [_img(images[stem], f"{kind} of {name}") for kind, stem in
                (("confusion matrix", plot_stem("confusion", layer)),
                 ("per-class accuracy", plot_stem("per_class", layer))) if stem in images]
        parts.append('<div class="pair">' + "".join(pair) + "</div>")
    return "\n".join(parts)


def _settings(report: Report) -> str:
    """The models (one row each: weights, checksum, preprocessing, cache), the study's settings,
    the extraction runs and the package versions."""
    models = [[m.model, f"RANDOM ({m.weights}), not pretrained" if m.weights_random else m.weights,
               m.weights_checksum, _text(m.preprocess), m.cache] for m in report.models]
    fields = [("Dataset", report.dataset), ("Dataset root", report.dataset_root),
              ("Classes", report.classes), ("Split", report.split), ("Seed", report.seed),
              ("Training images per class", report.train_per_class),
              ("Split file", report.split_file), ("Scaling", report.scaling),
              ("C option", report.C_option)]
    parts = [_table(["Model", "Weights", "Weights checksum", "Preprocessing", "Feature cache"], models),
             _table(["Setting", "Value"], [[name, _text(value)] for name, value in fields])]
    runs = [(m.model, run) for m in report.models for run in m.extraction_runs]
    parts.append("<h3>Extraction runs</h3>")
    if runs:
        keys = list(dict.fromkeys(key for _, run in runs for key in run))
        by_model = ["model"] if report.multi_model else []
        parts.append(_table(by_model + keys, [([model] if by_model else [])
                                              + [_text(run.get(key)) for key in keys]
                                              for model, run in runs]))
    else:
        parts.append("<p>none recorded</p>")
    parts += ["<h3>Versions</h3>", _table(["Package", "Version"], [
        [name, _text(version)] for name, version in report.versions.items()])]
    return "\n".join(parts)


def _skipped(skipped: dict[str, str]) -> str:
    if not skipped:
        return "<p>none</p>"
    items = [f"<li>{escape(shown(path))}: {escape(str(reason))}</li>"
             for path, reason in sorted(skipped.items())]
    return f"<p>{len(skipped)} unreadable images were left out:</p>\n<ul>\n" + "\n".join(
        items) + "\n</ul>"
