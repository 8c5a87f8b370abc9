"""The `featx` commands: each parses its options, calls featx.study or featx.report, and prints.

Option values are checked where the library takes them (featx.options, ExtractOptions,
ProbingOptions); a command only turns text into those values and results into lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featx.cli.progress import progress_bar
from featx.errors import FeatxError, OptionError
from featx.options import (
    MAX_PIXELS,
    Decode,
    Dtype,
    Precision,
    Scaling,
    Solver,
    Tta,
    Verify,
    writable_file,
    writable_folder,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Pretrained network layer features, cached to HDF5, compared with linear probes "
                       "(SVM, logistic regression), k-NN and any registered probe.")

# --- shared options ---------------------------------------------------------------------------
Model = Annotated[str, typer.Option("--model", "-m", help=(
    "Any torchvision classifier (vgg16, resnet50, vit_b_16, ...: `featx models` lists them), "
    "efficientnet_lite0/1/2, or SOURCE:NAME of another model source (timm:NAME, ...)."))]
Layers = Annotated[list[str] | None, typer.Option(
    "--layer", "-l", help="Layer name; repeat or comma-separate. Default: the model's standard layers.")]
Weights = Annotated[str, typer.Option(
    help="imagenet (the model's first pretrained set, downloaded once), random (seeded baseline), "
         "a weight set such as IMAGENET1K_V2 (`featx models` lists them), or PATH to local weights.")]
Cache = Annotated[Path | None, typer.Option(
    help="Cache folder. Default: $FEATX_CACHE or ./featx-cache.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOption = Annotated[str, typer.Option(
    "--precision", help=f"{Precision.names()}. auto: bf16 on a GPU (fp16 where bf16 is missing), fp32 "
                        "on a CPU.")]
BatchSize = Annotated[int | None, typer.Option(
    help="Images per forward pass. Default: 32 on a CPU; on a GPU the largest power of two up to 256 "
         "that fits in half of its free memory.")]
Workers = Annotated[int | None, typer.Option(
    help="Image-decoding worker processes (threads that read files, with --decode device). Default: "
         "cores - 1, at most 8.")]
ShardSize = Annotated[int, typer.Option(help="Images per HDF5 shard (at most; large layers get fewer).")]
DtypeOption = Annotated[str, typer.Option(
    "--dtype", help=f"Cached feature type: {Dtype.names()}. auto: float16 on a GPU (half the bytes to "
                    "copy, write and read), float32 on a CPU.")]
DecodeOption = Annotated[str, typer.Option(
    "--decode", help=f"How images are decoded: {Decode.names()}. pil: PIL in worker processes; "
                     "device: JPEG batches decoded on the device, other files through PIL; auto: device "
                     "on a GPU, pil on a CPU. Part of the cache's identity.")]
TtaOption = Annotated[str, typer.Option(
    "--tta", help=f"{Tta.names()}. flip: each image's features averaged with its mirror's (one pass "
                  "over a batch twice the size); a cache of its own.")]
VerifyOption = Annotated[str | None, typer.Option(
    "--verify", help=f"How the cache recognises its images: {Verify.names()}. size: size and modification "
                     "time; hash: the bytes too (a file is read again when its times move). Default: as "
                     "the cache was made (size for a new one); hash makes a cache hash from then on.",
    show_default=False)]
MaxPixels = Annotated[int, typer.Option(
    help="The largest image decoded, in pixels; a larger one is skipped with a note (memory stays "
         "bounded). A JPEG over 40 megapixels is decoded at reduced scale.")]
Seed = Annotated[int, typer.Option(help="Seed of the split, of CV folds and of random weights.")]
CValue = Annotated[str, typer.Option("--C", help="C of the linear probes, or auto: cross-validated on "
                                                 "the training part.")]
ScalingOption = Annotated[str, typer.Option("--scaling", help=f"Feature scaling: {Scaling.names()}.")]
TrainPerClass = Annotated[str | None, typer.Option(
    help="Training images per class for the seeded split. Default: 100 (the 15-Scene protocol) "
         "where every class has more images, else half of the smallest class; the table says which. "
         "Several, comma-separated (5,10,25,50,100), draw a learning curve: every probe at each size, on "
         "the same test images; the table trains on the largest.", show_default=False)]
SplitFile = Annotated[Path | None, typer.Option("--split", help="CSV with path,label,split (train/test).")]
Splits = Annotated[int, typer.Option(
    help="Random splits to train and test on (mean +/- std); 1 with a fixed split.")]
Probe = Annotated[str, typer.Option(
    help="Probes, comma-separated, a column each: svm (linear SVM, the default), logreg (logistic "
         "regression), knn (nearest neighbours, cosine); `featx probes` lists every registered probe.")]
ProbeOption = Annotated[list[str] | None, typer.Option(
    "--probe-option", help="A probe's own parameter as PROBE.PARAM=VALUE, such as knn.k=10; repeat for "
                           "several. `featx probes` lists them with their defaults and ranges.")]
SolverOption = Annotated[str, typer.Option(
    "--solver", help=f"Linear SVM solver: {Solver.names()}. torch: every C and fold as one batched "
                     "problem, GPU or CPU; liblinear: scikit-learn's LinearSVC; auto: the faster for "
                     "each layer's size (the table's notes say which).")]
Threads = Annotated[int | None, typer.Option(
    help="At most this many threads per probe, from 1 to the cores featx may use. Default: torch's "
         "own count; a probe runs on fewer where its work is small (one for a small layer).")]
Svg = Annotated[bool, typer.Option(
    "--svg", help="Also write each figure as SVG (for a paper); PNG is always written.")]
Memory = Annotated[str, typer.Option(
    help="Memory budget of a probe (such as 2G or 512M): layers stream from the cache in blocks "
         "within it, whatever their size.")]
OutDir = Annotated[Path | None, typer.Option(
    "--out", help="Results folder. Default: featx-results/DATASET/MODEL-WEIGHTS.")]
# choosing one cache among several (svm, similarity): left out means any, then the default variant
CachedDataset = Annotated[str | None, typer.Option(
    "--dataset", help="Dataset in the cache, when it holds several: its name, or its folder.")]
CachedWeights = Annotated[str | None, typer.Option(
    "--weights", help="Weights in the cache (imagenet, random, a tag or a file), when several.")]
CachedTta = Annotated[str | None, typer.Option(
    "--tta", help="none or flip: the cache made with that --tta, when there are both.")]
CachedDtype = Annotated[str | None, typer.Option(
    "--dtype", help="float32 or float16: the cache made with that --dtype, when there are both.")]
CachedDecode = Annotated[str | None, typer.Option(
    "--decode", help="pil or device: the cache made with that --decode, when there are both.")]


def _extract_options(**values):
    from featx.extract.run import ExtractOptions

    return ExtractOptions(**values)


def _probing_options(split: Path | None, **values):
    from featx.study import ProbingOptions

    return ProbingOptions(split_file=str(split) if split else None, **values)


def _layer_names(layer: list[str] | None) -> list[str] | None:
    """--layer values, repeated or comma-separated."""
    return [n.strip() for item in layer or [] for n in item.split(",") if n.strip()] or None


def _write_figures(report, out_dir: Path, html: Path | None, *, svg: bool) -> None:
    """Plots beside the table (when matplotlib is installed) and the optional HTML page."""
    try:
        from featx.report.plots import write_plots
    except FeatxError as exc:
        typer.echo(f"note: no plots ({exc})", err=True)
        return
    plots = write_plots(report, out_dir, svg=svg)
    typer.echo(f"plots: {len(plots)} figures ({'PNG and SVG' if svg else 'PNG'}) in {out_dir}", err=True)
    if (out_dir / "similarity.png").is_file():  # featx similarity was run into this folder
        plots["similarity"] = [out_dir / "similarity.png"]
    if html:
        from featx.report.html import write_html

        typer.echo(f"report: {write_html(report, html, plots)}", err=True)


def _print_layer(result) -> None:
    kind = "kernel form" if result.kernel_form else "on the features"
    C = f"C {result.C:g}  " if result.C is not None else ""
    typer.echo(f"{result.layer:>12}  accuracy {result.accuracy:.4f}  "
               f"balanced {result.balanced_accuracy:.4f}  "
               f"dim {result.dim:>7}  {C}{result.probe} {result.train_seconds:.2f} s ({kind}, "
               f"{result.n_train} train / {result.n_test} test)"
               + ("" if result.converged else "  NOT CONVERGED"), err=True)


def _gpu_count(gpus: str) -> int:
    """--gpus all or N -> how many ranks to start; a clear error where there are not so many."""
    import torch

    available = torch.cuda.device_count()
    if gpus != "all" and not (gpus.isdigit() and int(gpus) >= 1):
        raise OptionError("gpus", f"must be all or a number of GPUs, not {gpus!r}")
    wanted = available if gpus == "all" else int(gpus)
    if available == 0 or wanted > available:
        raise OptionError("gpus", f"asks for {gpus} GPUs and this machine has {available}")
    return wanted


def _given_arguments(ctx: typer.Context, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives this command the values it was given (defaults left out), for
    ranks that run the same command; `leave_out` names parameters not passed on."""
    positional: list[str] = []
    options: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if (param.name in leave_out or value is None
                or ctx.get_parameter_source(param.name).name == "DEFAULT"):
            continue
        values = value if param.multiple else [value]
        if param.param_type_name == "argument":
            positional += [str(v) for v in values]
        elif getattr(param, "is_flag", False):
            options.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            options += [text for v in values for text in (param.opts[0], str(v))]
    return [ctx.command.name, *positional, *options]


# --- commands ---------------------------------------------------------------------------------
@app.command()
def extract(
    ctx: typer.Context,
    dataset: Annotated[Path, typer.Argument(help="Folder of class subfolders, or with train/ and test/.")],
    layer: Layers = None, model: Model = "vgg16", weights: Weights = "imagenet",
    cache: Cache = None, device: Device = "auto", precision: PrecisionOption = "auto",
    batch_size: BatchSize = None, workers: Workers = None, shard_size: ShardSize = 512,
    dtype: DtypeOption = "auto", seed: Seed = 0, verify: VerifyOption = None, tta: TtaOption = "none",
    decode: DecodeOption = "auto", max_pixels: MaxPixels = MAX_PIXELS,
    gpus: Annotated[str | None, typer.Option(
        help="Extract on several GPUs of this machine: all, or a number. featx starts one rank per "
             "GPU itself (under torchrun or Slurm, leave it out: the launcher starts the ranks).")] = None,
) -> None:
    """Run the network once over DATASET and cache the requested layers to HDF5 shards.

    Examples: `featx extract --layer pool5 15scene/` ; `featx extract 15scene/` (vgg16's
    pool4, pool5, relu6, relu7 in one pass) ; `featx extract data/demo --model efficientnet_lite0`
    ; `featx extract imagenet/train --gpus all`. An interrupted run resumes from the first missing
    shard, with any number of ranks.
    """
    from featx.data.scan import find_images
    from featx.extract.ranks import Ranks, launch_local
    from featx.extract.run import ExtractOptions, extract_images

    options = ExtractOptions(device=device, precision=precision, batch_size=batch_size, workers=workers,
                             shard_size=shard_size, dtype=dtype, verify=verify, tta=tta, decode=decode,
                             max_pixels=max_pixels)
    count = _gpu_count(gpus) if gpus is not None and not Ranks.from_env().several else 1
    if count > 1:
        if options.device not in ("auto", "cuda"):
            raise OptionError("device", f"is {device}, but --gpus {gpus} puts each rank on a GPU of its "
                              "own: leave --device out")
        raise typer.Exit(launch_local(_given_arguments(ctx, leave_out=("gpus",)), count))
    extract_images(find_images(dataset), model, _layer_names(layer), weights=weights, cache=cache, seed=seed,
                   options=options, progress=progress_bar)


@app.command()
def svm(
    layer: Layers = None, dataset: CachedDataset = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model in the cache, when it holds several.")] = None,
    weights: CachedWeights = None, tta: CachedTta = None, dtype: CachedDtype = None,
    decode: CachedDecode = None, cache: Cache = None, C: CValue = "auto", scaling: ScalingOption = "l2",
    train_per_class: TrainPerClass = None, seed: Seed = 0, split: SplitFile = None,
    splits: Splits = 1, out: OutDir = None, probe: Probe = "svm", probe_option: ProbeOption = None,
    solver: SolverOption = "auto", memory: Memory = "2G", device: Device = "auto", threads: Threads = None,
    verify: Annotated[str | None, typer.Option(
        "--verify", help="size or hash: how the cache's images are checked before scoring, for this run "
                         "(default: as the cache was made).", show_default=False)] = None,
) -> None:
    """Train a linear SVM (or the probes of --probe) per cached layer, streamed from the cache
    within --memory; print accuracy, balanced accuracy, dim, C and time.

    Examples: `featx svm --layer relu7` (finds the cache in ./featx-cache) ;
    `featx svm --layer pool5 --C 1 --scaling standardize` ; `featx svm --dataset 15scene --model vgg16` ;
    `featx svm --layer pool1 --probe svm,logreg,knn --memory 1G` ;
    `featx svm --probe knn --probe-option knn.k=10`.
    Each model is saved with joblib beside a JSON report in the results folder.
    """
    from featx.extract.ranks import Ranks
    from featx.report.tables import render_markdown, write_table
    from featx.study import default_out_dir, evaluate, find_store

    options = _probing_options(split, C=C, scaling=scaling, train_per_class=train_per_class, seed=seed,
                               splits=splits, probe=probe, solver=solver, memory=memory, device=device,
                               probe_params=probe_option or (), verify=verify, threads=threads)
    store = find_store(cache, dataset, model, weights=weights, tta=tta, dtype=dtype, decode=decode)
    out_dir = out or default_out_dir(store)
    lead = Ranks.from_env().lead  # under torchrun every rank probes, rank 0 reports
    report = evaluate(store, _layer_names(layer), options, out_dir=out_dir,
                      on_layer=_print_layer if lead else None)
    if not lead:
        return
    paths = write_table(report, out_dir, stem="svm")
    typer.echo(render_markdown(report))
    typer.echo(f"written: {', '.join(map(str, paths.values()))}", err=True)


@app.command()
def table(
    dataset: Annotated[Path, typer.Argument(help="Folder of class subfolders, or with train/ and test/.")],
    model: Annotated[list[str], typer.Option(
        "--model", "-m", help="Model; repeat for one table comparing several.")] = ["vgg16"],  # noqa: B006
    layer: Layers = None, weights: Weights = "imagenet", cache: Cache = None,
    C: CValue = "auto", scaling: ScalingOption = "l2", train_per_class: TrainPerClass = None,
    seed: Seed = 0, split: SplitFile = None, splits: Splits = 1, out: OutDir = None,
    probe: Probe = "svm", probe_option: ProbeOption = None, solver: SolverOption = "auto",
    memory: Memory = "2G", threads: Threads = None,
    html: Annotated[Path | None, typer.Option(help="Also write the one-page HTML report here.")] = None,
    svg: Svg = False, device: Device = "auto",
    precision: PrecisionOption = "auto", batch_size: BatchSize = None, workers: Workers = None,
    shard_size: ShardSize = 512, dtype: DtypeOption = "auto", verify: VerifyOption = None,
    tta: TtaOption = "none", decode: DecodeOption = "auto", max_pixels: MaxPixels = MAX_PIXELS,
) -> None:
    """The layer-comparison table: extract all layers in one pass (or reuse the cache), train an
    SVM (or the probes of --probe) per layer, print the table and write it as Markdown, CSV and JSON.

    Examples: `featx table 15scene/ --model vgg16` ; `featx table data/demo --model
    efficientnet_lite0 --train-per-class 12` ; `featx table 15scene/ --model efficientnet_lite0
    --split 15scene-split.csv` ; `featx table 15scene/ --model vgg16 --model resnet50 --splits 5
    --html report.html` ; `featx table 15scene/ --probe svm,logreg,knn` ; `featx table data/demo --model
    efficientnet_lite0 --train-per-class 2,4,8,12` (a learning curve) ; `featx table data/demo --model
    efficientnet_lite0 --probe svm,mlp --probe-option mlp.hidden=256` (a small MLP head beside the SVM).
    """
    from featx.extract.ranks import Ranks
    from featx.report.tables import render_markdown
    from featx.study import run_table

    extract_options = _extract_options(device=device, precision=precision, batch_size=batch_size,
                                       workers=workers, shard_size=shard_size, dtype=dtype, verify=verify,
                                       tta=tta, decode=decode, max_pixels=max_pixels)
    probing = _probing_options(split, C=C, scaling=scaling, train_per_class=train_per_class, seed=seed,
                               splits=splits, probe=probe, solver=solver, memory=memory, device=device,
                               probe_params=probe_option or (), threads=threads)
    if html:
        writable_file(html, "html")
    lead = Ranks.from_env().lead  # under torchrun every rank extracts and probes, rank 0 reports
    report, paths = run_table(dataset, model, _layer_names(layer), weights=weights, cache=cache, out_dir=out,
                              extract_options=extract_options, probing=probing, progress=progress_bar,
                              on_layer=_print_layer if lead else None)
    if not lead:
        return
    typer.echo(render_markdown(report))
    typer.echo(f"written: {', '.join(map(str, paths.values()))}", err=True)
    _write_figures(report, paths["json"].parent, html, svg=svg)


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="Show only models whose name contains this.")] = None,
) -> None:
    """List the models featx knows, with their weight sets and input sizes.

    Examples: `featx models` ; `featx models resnet` ; then `featx layers --model resnet50`.
    Model sources with a prefix (timm:NAME, ...) take any name of their library.
    """
    from featx.models import model_names, prefixed_sources, weight_sets

    for model_name in model_names():
        if name and name.lower() not in model_name:
            continue
        sets = weight_sets(model_name)
        tags = ", ".join(f"{w.tag} ({w.preprocess.crop}px)" for w in sets) or "none"
        typer.echo(f"{model_name:<20} {tags}")
    for source in prefixed_sources():
        typer.echo(f"{source.PREFIX + 'NAME':<20} {source.SUMMARY}")


@app.command()
def layers(model: Model = "vgg16", weights: Weights = "imagenet") -> None:
    """List the layer names a model offers, with their dimensions at its weights' input size.

    Examples: `featx layers --model resnet50` ; `featx layers --model vit_b_16` ;
    `featx layers --model vit_b_16 --weights IMAGENET1K_SWAG_E2E_V1` (384x384 input).
    """
    from featx.models import get_model

    spec = get_model(model, weights)
    w = spec.weights
    typer.echo(f"{spec.name}: weights {w.describe()}; input {w.preprocess.describe()}; "
               f"default layers (*): {', '.join(spec.default_layers)}")
    for item in spec.layers:
        mark = "*" if item.name in spec.default_layers else " "
        typer.echo(f"{mark} {item.name:<24} {item.dim:>8}  {item.describe_shape():<34} {item.description}")


@app.command()
def probes() -> None:
    """List the probes `--probe` takes, with their parameters (`--probe-option PROBE.PARAM=VALUE`).

    Example: `featx probes` ; then `featx svm --probe knn --probe-option knn.k=10`.
    """
    from featx.probes import registered

    for probe in registered().values():
        typer.echo(f"{probe.name:<8} {probe.title}: {probe.summary}"
                   + ("; C by cross-validation or --C" if probe.chooses_C else ""))
        for param in probe.params:
            typer.echo(f"  {probe.name}.{param.name}={param.default:g}  {param.help} "
                       f"({param.low:g} to {param.high:g})")


@app.command()
def similarity(
    layer: Layers = None, dataset: CachedDataset = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="Model in the cache; repeat to compare the layers of several.")] = None,
    weights: CachedWeights = None, tta: CachedTta = None, dtype: CachedDtype = None,
    decode: CachedDecode = None, cache: Cache = None, out: OutDir = None, memory: Memory = "2G",
    device: Device = "auto",
) -> None:
    """Linear CKA between every pair of cached layers (of one model, or of several on the same
    images): a table, similarity.csv and a heatmap similarity.png, which the HTML report shows.

    Examples: `featx similarity` ; `featx similarity --model vgg16 --model resnet50 --dataset 15scene`.
    """
    from featx.options import parse_device, parse_memory
    from featx.report.similarity import heatmap
    from featx.study import default_out_dir, find_store, layer_similarity

    memory_bytes, device = parse_memory(memory), parse_device(device)  # checked before work
    stores = [find_store(cache, dataset, name, weights=weights, tta=tta, dtype=dtype, decode=decode)
              for name in (model or [None])]
    folder = writable_folder(out or default_out_dir(stores[0]), "out")
    result = layer_similarity(stores, _layer_names(layer), memory_bytes, device=device)
    width = max(len(name) for name in result.names)
    typer.echo(" " * width + "  " + "  ".join(f"{i:>5}" for i in range(len(result.names))))
    for i, (name, row) in enumerate(zip(result.names, result.matrix)):
        typer.echo(f"{name:>{width}}  " + "  ".join(f"{v:5.2f}" for v in row) + f"   ({i})")
    paths = [result.write_csv(folder / "similarity.csv")]
    try:
        paths.append(heatmap(result, folder / "similarity.png",
                             f"linear CKA on {result.n_images} images of {stores[0].manifest.dataset}"))
    except ImportError:
        typer.echo("note: no heatmap (matplotlib is missing: pip install 'featx[plot]')", err=True)
    typer.echo(f"written: {', '.join(map(str, paths))}", err=True)


@app.command()
def export(
    out: Annotated[Path, typer.Option(
        "--out", help="The file to write; its suffix names the format: .npy, .npz, .parquet, .mat or .csv. "
                      "With several layers, one file each: OUT-LAYER.SUFFIX.", show_default=False)],
    layer: Annotated[list[str] | None, typer.Option(
        "--layer", "-l", help="Cached layer, or a combination such as pool5+relu7 (each part scaled to "
                              "unit length, side by side); repeat or comma-separate for several. Default: "
                              "the cache's layer, when it holds one.")] = None,
    format_: Annotated[str | None, typer.Option(
        "--format", help="npy, npz, parquet, csv, or mat (MATLAB v5, or v7.3 when v5 cannot hold the "
                         "layer), mat5, mat73. Default: from the suffix of --out.",
        show_default=False)] = None,
    dataset: CachedDataset = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model in the cache, when it holds several.")] = None,
    weights: CachedWeights = None, tta: CachedTta = None, dtype: CachedDtype = None,
    decode: CachedDecode = None, cache: Cache = None, split: SplitFile = None,
    train_per_class: Annotated[int | None, typer.Option(
        help="Write a seeded split (as featx svm draws it): this many training images per class, the "
             "rest for test. Default: no split, unless --split or the dataset's own train/ and test/ give "
             "one.", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of that split (alone: the split with the default training images per class).",
        show_default=False)] = None,
    memory: Annotated[str, typer.Option(
        help="Memory budget: the layer is written block by block within it, whatever its size (MATLAB "
             "v5 is written from memory: past the budget, .mat is written as v7.3).")] = "2G",
) -> None:
    """Write cached layers to files other tools read: NumPy, Parquet, MATLAB or CSV, one row per image
    (in dataset order) with its path, label and split, the features exactly as cached.

    Examples: `featx export --layer pool --out pool.npy` ;
    `featx export --layer pool --out pool.parquet --train-per-class 10 --seed 1` ;
    `featx export --layer pool --out pool.mat --split split.csv` ;
    `featx export --layer pool --out pool.mat --format mat73` ;
    `featx export --layer stage2_pool+pool --out both.npz` ;
    `featx export --layer pool,stage2_pool --out small.csv` (writes small-pool.csv and
    small-stage2_pool.csv). Paths stay the file system's bytes; docs/export.md says what each format holds.
    """
    from featx.export import ExportOptions, export_layers, output_format
    from featx.study import find_store

    output_format(out, format_)  # an unknown suffix or format, a place that cannot be written: said
    writable_file(out, "out")  # before any work
    options = ExportOptions(format=format_, memory=memory, split_file=str(split) if split else None,
                            train_per_class=train_per_class, seed=seed)
    store = find_store(cache, dataset, model, weights=weights, tta=tta, dtype=dtype, decode=decode)
    for exported in export_layers(store, _layer_names(layer), out, options, progress=progress_bar):
        typer.echo(exported.describe())


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    model: Model = "efficientnet_lite0", weights: Weights = "imagenet",
    top: Annotated[int, typer.Option(help="How many classes to show.")] = 3, device: Device = "auto",
) -> None:
    """Top-k ImageNet classes of each image with their probabilities.

    Example: `featx predict cat.jpg --top 5` ; `featx predict a.jpg b.png --model vgg16`.
    """
    from featx.extract.predict import predict_images

    for path, ranked in predict_images(images, model, weights, top=top, device=device):
        typer.echo(f"{path}:")
        for name, probability in ranked:
            typer.echo(f"  {name} {probability * 100:.2f}%")


def _report_path(path: Path) -> Path:
    path = path / "table.json" if path.is_dir() else path
    if not path.is_file():
        raise FeatxError(f"no report JSON at {path} (featx table writes table.json)")
    return path


def _read_report(path: Path):
    from featx.report.tables import load_report

    return load_report(_report_path(path))


ReportArg = Annotated[Path, typer.Argument(help="A table.json written by featx table, or its folder.")]


@app.command()
def plot(report: ReportArg, out: Annotated[Path | None, typer.Option(
        "--out", help="Folder for the figures. Default: beside the JSON.")] = None, svg: Svg = False) -> None:
    """Redraw the plots (accuracy per layer, confusion matrices, per-class accuracy) from a
    saved report, without touching the model.

    Examples: `featx plot featx-results/15scene/vgg16-imagenet/table.json` ; `featx plot
    featx-results/15scene/vgg16-imagenet --svg` (each figure also as SVG, for a paper).
    """
    from featx.report.plots import write_plots

    data = _read_report(report)
    folder = writable_folder(out or _report_path(report).parent, "out")
    plots = write_plots(data, folder, svg=svg)
    typer.echo(f"{len(plots)} figures ({'PNG and SVG' if svg else 'PNG'}) in {folder}")


@app.command("report")
def html_report(report: ReportArg, html: Annotated[Path | None, typer.Option(
        help="Output file. Default: report.html beside the JSON.")] = None) -> None:
    """Write ONE self-contained HTML page (table, plots, confusion matrices, settings, skipped
    images) from a saved report; it opens in a browser as it is.

    Example: `featx report featx-results/15scene/vgg16-imagenet --html vgg16.html`.
    """
    from featx.report.html import write_html

    data = _read_report(report)
    folder = _report_path(report).parent
    target = writable_file(html or folder / "report.html", "html")
    similar = folder / "similarity.png"
    extra = {"similarity": [similar]} if similar.is_file() else None
    typer.echo(f"report: {write_html(data, target, extra=extra)}")


@app.command()
def info(
    folder: Annotated[Path | None, typer.Argument(
        help="Cache folder (as --cache). Default: $FEATX_CACHE or ./featx-cache.",
        show_default=False)] = None,
    cache: Cache = None,
) -> None:
    """List cached datasets and models: images, layers, shards, size on disk, skipped files.

    Example: `featx info` ; `featx info --cache /data/featx-cache`.
    """
    from featx.cache.store import default_cache_root, list_stores

    if folder and cache and folder != cache:
        raise OptionError("cache", f"is {cache}, and the folder given is {folder}: give one")
    root = cache or folder or default_cache_root()
    stores, broken = list_stores(root)
    for place, reason in broken.items():
        typer.echo(f"{place}: passed over: {reason}")
    if not stores and not broken:
        raise FeatxError(f"no featx cache under {root}")
    for store in stores:
        s = store.summary()
        typer.echo(f"{s['cache']}: {s['images']} images, {s['classes']} classes, weights "
                   f"{s['weights']}, {s['dtype']}, made {s['created']}, "
                   f"{len(s['skipped'])} skipped")
        for name, layer in s["layers"].items():
            typer.echo(f"  {name:<12} dim {layer['dim']:>7}  shards {layer['shards']}/"
                       f"{layer['shards_total']}  {layer['bytes'] / 2**20:8.1f} MiB")
        for run in s["runs"]:
            status = {"done": "", "stopped": ", stopped", "running": ", running or killed"}[run["status"]]
            typer.echo(f"  run {run['when']}: {run['images']} images in {run['seconds']:.1f} s "
                       f"on {run['device']} {run['precision']} ({', '.join(run['layers'])}{status})")
        for path, reason in s["skipped"].items():
            typer.echo(f"  skipped {path}: {reason}")


@app.command()
def verify(
    dataset: CachedDataset = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model in the cache.")] = None,
    weights: CachedWeights = None, tta: CachedTta = None, dtype: CachedDtype = None,
    decode: CachedDecode = None, cache: Cache = None,
    verify: Annotated[str | None, typer.Option(
        "--verify", help="size or hash: how the images are checked (default: as each cache says); hash "
                         "reads every image.")] = None,
) -> None:
    """Re-check a cache on demand: read every shard whole against its checksum, and compare the
    dataset with the cache's record of it. Every cache under --cache, or the one the filters name.
    A damaged shard is noted, so that the next `featx extract` writes it anew.

    Examples: `featx verify` ; `featx verify --model vgg16 --verify hash`.
    """
    from featx.cache.store import default_cache_root, list_stores
    from featx.study import find_store, verify_cache

    filters = (dataset, model, weights, tta, dtype, decode)
    if any(value is not None for value in filters):
        stores = [find_store(cache, dataset, model, weights=weights, tta=tta, dtype=dtype, decode=decode)]
    else:
        stores, broken = list_stores(cache or default_cache_root())
        for place, reason in broken.items():
            typer.echo(f"{place}: passed over: {reason}")
        if not stores:
            raise FeatxError(f"no featx cache under {cache or default_cache_root()}")
    problems = []
    for store in stores:
        found = verify_cache(store, verify)
        for layer, (shards, damaged) in found.layers.items():
            typer.echo(f"{store.label} {layer}: {shards - len(damaged)} of {shards} shards sound"
                       + (f", {len(damaged)} of {shards} shards damaged" if damaged else ""))
            problems += [f"{store.shard_path(layer, k)} ({why})" for k, why in damaged.items()]
        typer.echo(f"{store.label} images: {found.images or 'as extracted'}")
        if found.images:
            problems.append(f"{store.label}: {found.images}")
    if problems:
        raise FeatxError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}: " + "; ".join(problems)
                         + "; run featx extract again (only what is damaged or changed is redone)")


ACTIVATION_FORMATS = (".png", ".svg", ".pdf")


@app.command()
def activations(
    image: Annotated[Path, typer.Argument(help="An image file.")], model: Model = "vgg16",
    layer: Annotated[str, typer.Option("--layer", "-l", help="A convolutional layer.")] = "conv1_1",
    channels: Annotated[int, typer.Option(help="How many feature maps (the most active).")] = 16,
    weights: Weights = "imagenet", device: Device = "auto",
    out: Annotated[Path | None, typer.Option(
        help="PNG, SVG or PDF file. Default: IMAGE_MODEL_LAYER.png in this folder.")] = None,
) -> None:
    """Draw a layer's feature maps for one image as a grid, with the input beside it.

    Example: `featx activations cat.jpg --model vgg16 --layer conv1_1 --channels 16`.
    """
    from featx.report.activations import write_activation_grid

    target = out or Path(f"{image.stem}_{model}_{layer}.png".replace(":", "-"))
    if target.is_dir():
        raise OptionError("out", f"{target} is a folder; give a file name")
    if target.suffix.lower() not in ACTIVATION_FORMATS:
        raise OptionError("out", f"{target} must end in {', '.join(ACTIVATION_FORMATS)} (the formats the "
                          "grid is drawn in)")
    target = writable_file(target, "out")
    typer.echo(str(write_activation_grid(image, target, model, layer=layer, channels=channels,
                                         weights=weights,
                                         device=device)))
