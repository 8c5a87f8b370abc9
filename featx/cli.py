"""The `featx` command: a thin typer layer over featx.study and featx.report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from featx.errors import FeatxError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Pretrained CNN layer features, cached to HDF5, compared with a linear SVM.")

# --- shared options ---------------------------------------------------------------------------
Model = Annotated[str, typer.Option("--model", "-m", help="vgg16, resnet50 or efficientnet_lite0.")]
Layers = Annotated[Optional[list[str]], typer.Option(
    "--layer", "-l", help="Layer name; repeat or comma-separate. Default: the model's standard layers.")]
Weights = Annotated[str, typer.Option(
    help="imagenet (torchvision download, cached), random (seeded baseline), a torchvision "
         "variant such as IMAGENET1K_V2, or PATH to a state dict.")]
Cache = Annotated[Optional[Path], typer.Option(
    help="Cache folder. Default: $FEATX_CACHE or ./featx-cache.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16 (auto: bf16/fp16 on GPU, fp32 on CPU).")]
BatchSize = Annotated[int, typer.Option(help="Images per forward pass.")]
Workers = Annotated[Optional[int], typer.Option(help="Image-decoding worker processes. Default: cores - 1.")]
ShardSize = Annotated[int, typer.Option(help="Images per HDF5 shard (at most; large layers get fewer).")]
Dtype = Annotated[str, typer.Option(help="Cached feature type: float32 or float16.")]
Seed = Annotated[int, typer.Option(help="Seed of the split, of CV folds and of random weights.")]
CValue = Annotated[str, typer.Option("--C", help="SVM C, or auto: cross-validated on the training part.")]
Scaling = Annotated[str, typer.Option(help="Feature scaling: l2, standardize or none.")]
TrainPerClass = Annotated[int, typer.Option(help="Training images per class for the seeded split.")]
SplitFile = Annotated[Optional[Path], typer.Option("--split", help="CSV with path,label,split (train/test).")]
OutDir = Annotated[Optional[Path], typer.Option("--out", help="Results folder. Default: featx-results/<dataset>/<model>-<weights>.")]


def _extract_options(device, precision, batch_size, workers, shard_size, dtype):
    from featx.study import ExtractOptions

    return ExtractOptions(device=device, precision=precision, batch_size=batch_size,
                          workers=workers, shard_size=shard_size, dtype=dtype)


def _svm_options(C, scaling, train_per_class, seed, split):
    from featx.study import SvmOptions

    try:
        c_value: float | str = C if C == "auto" else float(C)
    except ValueError:
        raise FeatxError(f"--C must be a positive number or auto, not {C!r}") from None
    return SvmOptions(C=c_value, scaling=scaling, train_per_class=train_per_class, seed=seed,
                      split_file=str(split) if split else None)


def _print_layer(result) -> None:
    kind = "kernel form" if result.kernel_form else "primal"
    typer.echo(f"{result.layer:>12}  accuracy {result.accuracy:.4f}  dim {result.dim:>7}  "
               f"C {result.C:g}  svm {result.svm_seconds:.2f} s ({kind}, "
               f"{result.n_train} train / {result.n_test} test)", err=True)


# --- commands ---------------------------------------------------------------------------------
@app.command()
def extract(
    dataset: Annotated[Path, typer.Argument(help="Folder of class subfolders, or with train/ and test/.")],
    layer: Layers = None, model: Model = "vgg16", weights: Weights = "imagenet",
    cache: Cache = None, device: Device = "auto", precision: Precision = "auto",
    batch_size: BatchSize = 32, workers: Workers = None, shard_size: ShardSize = 512,
    dtype: Dtype = "float32", seed: Seed = 0,
) -> None:
    """Run the network once over DATASET and cache the requested layers to HDF5 shards.

    Examples: `featx extract --layer pool5 15scene/` ; `featx extract 15scene/` (vgg16's
    pool4, pool5, relu6, relu7 in one pass) ; `featx extract data/demo --model efficientnet_lite0`.
    An interrupted run resumes from the first missing shard.
    """
    from featx.study import extract as run_extract

    run_extract(dataset, model, layer, weights, cache, seed,
                _extract_options(device, precision, batch_size, workers, shard_size, dtype))


@app.command()
def svm(
    layer: Layers = None, dataset: Annotated[Optional[str], typer.Option(
        help="Dataset name in the cache, when it holds several.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model in the cache, when it holds several.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Weights in the cache (imagenet, random, ...), when several.")] = None,
    cache: Cache = None, C: CValue = "auto", scaling: Scaling = "l2",
    train_per_class: TrainPerClass = 100, seed: Seed = 0, split: SplitFile = None, out: OutDir = None,
) -> None:
    """Train a LinearSVC per layer on cached features; print accuracy, dim, C and time.

    Examples: `featx svm --layer relu7` (finds the cache in ./featx-cache) ;
    `featx svm --layer pool5 --C 1 --scaling standardize` ; `featx svm --dataset 15scene --model vgg16`.
    Each model is saved with joblib beside a JSON report in the results folder.
    """
    from featx.report import render_markdown, write_table
    from featx.study import default_out_dir, evaluate, find_store

    store = find_store(cache, dataset, model, weights)
    layers = [n.strip() for item in layer or [] for n in item.split(",") if n.strip()] or None
    out_dir = out or default_out_dir(store)
    report = evaluate(store, layers, _svm_options(C, scaling, train_per_class, seed, split),
                      out_dir, _print_layer)
    paths = write_table(report, out_dir, stem="svm")
    typer.echo(render_markdown(report))
    typer.echo(f"written: {paths['md']}, {paths['csv']}, {paths['json']}", err=True)


@app.command()
def table(
    dataset: Annotated[Path, typer.Argument(help="Folder of class subfolders, or with train/ and test/.")],
    model: Model = "vgg16", layer: Layers = None, weights: Weights = "imagenet", cache: Cache = None,
    C: CValue = "auto", scaling: Scaling = "l2", train_per_class: TrainPerClass = 100,
    seed: Seed = 0, split: SplitFile = None, out: OutDir = None, device: Device = "auto",
    precision: Precision = "auto", batch_size: BatchSize = 32, workers: Workers = None,
    shard_size: ShardSize = 512, dtype: Dtype = "float32",
) -> None:
    """The layer-comparison table: extract all layers in one pass (or reuse the cache), train an
    SVM per layer, print the table and write it as Markdown, CSV and JSON.

    Examples: `featx table 15scene/ --model vgg16` ; `featx table data/demo --model
    efficientnet_lite0 --train-per-class 12` ; `featx table 15scene/ --model efficientnet_lite0
    --split 15scene-split.csv`.
    """
    from featx.report import render_markdown
    from featx.study import run_table

    report, paths = run_table(
        dataset, model, layer, weights, cache, out,
        _extract_options(device, precision, batch_size, workers, shard_size, dtype),
        _svm_options(C, scaling, train_per_class, seed, split), on_layer=_print_layer)
    typer.echo(render_markdown(report))
    typer.echo(f"written: {paths['md']}, {paths['csv']}, {paths['json']}", err=True)


@app.command()
def layers(model: Model = "vgg16") -> None:
    """List the layer names a model offers, with their dimensions at 224x224 input.

    Example: `featx layers --model resnet50`.
    """
    from featx.models import get_backbone

    backbone = get_backbone(model)
    typer.echo(f"{backbone.name} (default layers: {', '.join(backbone.default_layers)})")
    for item in backbone.layers:
        shape = "x".join(map(str, item.shape)) + (" -> avg pool" if item.pooled else "")
        mark = "*" if item.name in backbone.default_layers else " "
        typer.echo(f"{mark} {item.name:<12} {item.dim:>8}  {shape:<22} {item.description}")


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    model: Model = "efficientnet_lite0", weights: Weights = "imagenet",
    top: Annotated[int, typer.Option(help="How many classes to show.")] = 3, device: Device = "auto",
) -> None:
    """Top-k ImageNet classes of each image with their probabilities.

    Example: `featx predict cat.jpg --top 5` ; `featx predict a.jpg b.png --model vgg16`.
    """
    from featx.predict import predict_images

    for path, ranked in predict_images(images, model, weights, top, device):
        typer.echo(f"{path}:")
        for name, probability in ranked:
            typer.echo(f"  {name} {probability * 100:.2f}%")


def main() -> None:
    """Entry point: a FeatxError becomes one line on stderr and exit code 2."""
    try:
        app()
    except FeatxError as exc:
        typer.echo(f"featx: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("featx: interrupted; completed shards are kept and the next run resumes", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
