"""The featx command end to end, as a user types it, on the embedded demo data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch

from featx.cache.store import FeatureStore

from conftest import assert_clean_error, read_predictions, run_cli, run_installed, write_images

LITE = ["--model", "efficientnet_lite0"]
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory, demo_dir):
    """A working folder where `featx extract` of the demo data has run once."""
    work = tmp_path_factory.mktemp("work")
    result = run_cli("extract", str(demo_dir), *LITE, "--layer", "stage7_pool,pool", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "96 images" in result.stderr
    # stderr is a pipe here, not a terminal: progress comes as plain, unwrapped lines, the last one
    # complete, and the summary stays on one line
    lines = result.stderr.splitlines()
    assert any(line.startswith("demo efficientnet_lite0 [stage7_pool, pool] on cpu")
               and "96/96 images" in line and "images/s" in line for line in lines)
    assert any("96 images" in line and "featx-cache" in line for line in lines)
    return work


def _layer_rows(stdout: str) -> dict[str, int]:
    """{layer name: dimension} from `featx layers` output (a * marks the defaults)."""
    rows = {}
    for line in stdout.splitlines()[1:]:
        words = line.removeprefix("*").split()
        rows[words[0]] = int(words[1])
    return rows


def test_layers_lists_names_and_dims(tmp_path) -> None:
    result = run_cli("layers", "--model", "vgg16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = _layer_rows(result.stdout)
    assert rows["pool4"] == 100352 and rows["pool5"] == 25088
    assert rows["relu6"] == 4096 and rows["relu7"] == 4096
    defaults = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("*")]
    assert defaults == ["pool4", "pool5", "relu6", "relu7"]


def test_svm_after_extract_finds_the_cache_with_no_other_argument(demo_workdir) -> None:
    result = run_cli("svm", "--layer", "pool", "--train-per-class", "12", cwd=demo_workdir)
    assert result.returncode == 0, result.stderr
    assert "| pool |" in result.stdout and "Feature Dim" in result.stdout
    out = demo_workdir / "featx-results" / "demo" / "efficientnet_lite0-imagenet"
    report = json.loads((out / "pool.json").read_text())
    assert report["accuracy"] >= 0.6 and report["dim"] == 1280 and report["n_train"] == 48  # chance: 0.25
    model = joblib.load(out / "pool.joblib")
    store = FeatureStore(demo_workdir / "featx-cache" / "demo" / "efficientnet_lite0-imagenet")
    data = store.read_layer("pool")
    row = {path: k for k, path in enumerate(store.rows.paths(data.index))}
    predictions = read_predictions(out, "pool")
    assert len(predictions) == report["n_test"] and set(predictions[0]) == {"split", "path", "true", "svm"}
    test_rows = [row[p["path"]] for p in predictions]
    assert [p["true"] for p in predictions] == [store.classes[y] for y in store.labels[data.index[test_rows]]]
    # the saved model applies to raw features and predicts what the predictions file says it predicted
    predicted = model.predict(data.features[test_rows])
    assert [store.classes[y] for y in predicted] == [p["svm"] for p in predictions]
    confusion = np.array(report["confusion"])  # and the report's matrix counts those predictions
    assert confusion.sum() == report["n_test"]
    assert np.trace(confusion) == sum(p["true"] == p["svm"] for p in predictions)


def test_several_probes_give_a_column_each_and_a_model_each(demo_workdir) -> None:
    out = demo_workdir / "probes"
    result = run_cli("svm", "--layer", "stage7_pool,pool", "--train-per-class", "12",
                     "--probe", "svm,logreg,knn", "--memory", "256M", "--out", str(out), cwd=demo_workdir)
    assert result.returncode == 0, result.stderr
    header = (out / "svm.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == ["Layer", "svm Accuracy", "svm Balanced", "logreg Accuracy", "logreg Balanced",
                          "knn Accuracy", "knn Balanced", "Feature Dim"]
    assert "svm C" in header and "logreg C" in header and "knn C" not in header
    report = json.loads((out / "svm.json").read_text())
    assert report["probes"] == ["svm", "logreg", "knn"]
    pool = next(layer for layer in report["layers"] if layer["layer"] == "pool")
    assert [p["probe"] for p in pool["other_probes"]] == ["logreg", "knn"]
    for score in [pool, *pool["other_probes"]]:
        assert 0.25 < score["accuracy"] <= 1 and 0.25 < score["balanced_accuracy"] <= 1
    # 12 training images per class of 24: the test part is balanced, so the two measures agree
    assert pool["balanced_accuracy"] == pytest.approx(pool["accuracy"])
    assert (out / "pool.joblib").is_file() and (out / "pool.logreg.joblib").is_file()
    assert not (out / "pool.knn.joblib").exists()
    logreg = joblib.load(out / "pool.logreg.joblib")
    store = FeatureStore(next((demo_workdir / "featx-cache" / "demo").iterdir()))
    data = store.read_layer("pool")
    probabilities = logreg.predict_proba(data.features[:5])
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)
    assert "Probes: svm" in result.stdout and "logreg" in result.stdout


def test_table_on_the_demo_data_writes_md_csv_json(demo_workdir, demo_dir) -> None:
    result = run_cli("table", str(demo_dir), *LITE, "--train-per-class", "12", cwd=demo_workdir)
    assert result.returncode == 0, result.stderr
    assert "already cached" not in result.stderr  # stage6_pool and logits were new
    out = demo_workdir / "featx-results" / "demo" / "efficientnet_lite0-imagenet"
    table = (out / "table.md").read_text()
    for name in ("stage6_pool", "stage7_pool", "pool", "logits"):
        assert f"| {name} |" in table and f"| {name} |" in result.stdout
    assert (out / "table.csv").read_text().startswith("Layer,Accuracy,Balanced,Feature Dim")
    assert (out / "accuracy.png").is_file() and not list(out.glob("*.svg"))  # SVG only with --svg
    report = json.loads((out / "table.json").read_text())
    for layer in report["layers"]:  # the JSON recomputes the table
        confusion = np.array(layer["confusion"])
        assert np.trace(confusion) / confusion.sum() == pytest.approx(layer["accuracy"])
        assert 0.6 <= layer["accuracy"] < 1.0  # the demo is hard enough that layers differ
    assert report["weights_random"] is False and report["split"].startswith("12 training images")
    quoted = (REPO / "data" / "README.md").read_text()  # the docs quote what this command prints
    for layer in report["layers"]:
        assert f"{layer['accuracy']:.4f} ({layer['layer']})" in quoted, layer["layer"]
    best, second = sorted(report["layers"], key=lambda layer: -layer["accuracy"])[:2]
    readme = (REPO / "README.md").read_text()
    assert (f"best: {best['layer']} at {best['accuracy']:.4f}, "
            f"{100 * (best['accuracy'] - second['accuracy']):.2f} points above") in readme


def test_random_weights_say_so_everywhere(tmp_path, demo_dir) -> None:
    result = run_cli("table", str(demo_dir), *LITE, "--weights", "random", "--layer", "pool",
                     "--train-per-class", "12", "--C", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RANDOM" in result.stderr and "RANDOM" in result.stdout
    out = tmp_path / "featx-results" / "demo" / "efficientnet_lite0-random-seed0"
    assert "RANDOM" in (out / "table.md").read_text()
    assert json.loads((out / "table.json").read_text())["weights_random"] is True


def test_svm_takes_the_default_variant_and_asks_only_when_given_options_leave_several(
        demo_workdir, demo_dir, demo_caches, tmp_path) -> None:
    shutil.copytree(demo_workdir / "featx-cache", tmp_path / "featx-cache")
    demo_caches.copy_to(tmp_path, "random")
    for extra in (["--weights", "random"], ["--dtype", "float16"], ["--weights", "random", "--seed", "1"]):
        made = run_cli("extract", str(demo_dir), *LITE, "--layer", "pool", *extra, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    plain = run_cli("svm", "--layer", "pool", "--train-per-class", "12", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr  # weights and dtype left out: imagenet, float32 on a CPU
    assert "RANDOM" not in plain.stdout and "efficientnet_lite0-imagenet/" in plain.stderr
    half = run_cli("svm", "--layer", "pool", "--dtype", "float16", "--train-per-class", "12", cwd=tmp_path)
    assert half.returncode == 0 and "efficientnet_lite0-imagenet-float16/" in half.stderr
    result = run_cli("svm", "--layer", "pool", "--weights", "random", cwd=tmp_path)  # seed 0 or 1?
    assert_clean_error(result, "holds several", "efficientnet_lite0-random-seed0",
                       "efficientnet_lite0-random-seed1", "choose one with --weights")
    chosen = run_cli("svm", "--layer", "pool", "--weights", "random-seed1", "--train-per-class", "12",
                     cwd=tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    assert "RANDOM" in chosen.stdout
    result = run_cli("svm", "--layer", "pool", "--decode", "device", cwd=tmp_path)
    assert_clean_error(result, "holds no features for decode device")


@pytest.mark.parametrize("model", ["efficientnet_lite1", "efficientnet_lite2"])
def test_every_lite_model_names_the_cat(tmp_path, model) -> None:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.jpg")
    result = run_cli("predict", str(tmp_path / "cat.jpg"), "--model", model, "--top", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert any(word in result.stdout.splitlines()[1] for word in ("cat", "tabby")), result.stdout


def test_predict_names_the_cat_and_the_coffee(tmp_path) -> None:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.jpg")
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.jpg")
    result = run_cli("predict", str(tmp_path / "cat.jpg"), str(tmp_path / "coffee.jpg"),
                     "--top", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    cat, coffee = lines[1:4], lines[5:8]
    assert any(word in line for line in cat for word in ("cat", "tabby"))
    assert any(word in line for line in coffee for word in ("cup", "espresso", "coffee"))
    assert all(line.strip().endswith("%") for line in cat + coffee)


def test_unreadable_images_are_warned_about_and_reported(tmp_path, demo_copy) -> None:
    (demo_copy / "disks" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    result = run_cli("table", str(demo_copy), *LITE, "--layer", "pool", "--train-per-class", "12",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped unreadable image disks/broken.jpg" in result.stderr
    report = json.loads((tmp_path / "featx-results" / "demo" / "efficientnet_lite0-imagenet"
                         / "table.json").read_text())
    assert list(report["skipped"]) == ["disks/broken.jpg"]
    assert "disks/broken.jpg" in (tmp_path / "featx-results" / "demo" /
                                  "efficientnet_lite0-imagenet" / "table.md").read_text()


@pytest.mark.parametrize("args, needles", [
    (["extract", "no/such/folder"], ["dataset folder not found"]),
    (["table", "{empty}"], ["no class folders"]),
    (["table", "{noimages}"], ["class folder b", "has no images"]),
    (["extract", "{tiny}", "--model", "vgg99"], ["unknown model 'vgg99'"]),
    (["extract", "{tiny}", "--model", "resnet50", "--weights", "IMAGENET9K"],
     ["resnet50 has no weights 'IMAGENET9K'", "IMAGENET1K_V2"]),
    (["extract", "{tiny}", "--weights", "random", "--batch-size", "0"], ["--batch-size must be"]),
    (["extract", "{tiny}", "--weights", "random", "--batch-size", "-5"], ["--batch-size must be"]),
    (["extract", "{tiny}", "--weights", "random", "--shard-size", "0"], ["--shard-size must be"]),
    (["extract", "{tiny}", "--weights", "random", "--batch-size", "x"], ["--batch-size"]),
    (["table", "{tiny}", "--weights", "random", "--C", "-1"], ["--C must be a positive"]),
    (["table", "{tiny}", "--weights", "random", "--C", "nan"], ["--C must be a positive"]),
    (["table", "{tiny}", "--weights", "random", "--C", "inf"], ["--C must be a positive"]),
    (["table", "{oneclass}", "--weights", "random"], ["has one class (a)"]),
    (["svm", "--cache", "{cache}", "--scaling", "cube"], ["--scaling must be one of"]),
    (["extract", "{tiny}", "--layer", "pool9"], ["unknown layer 'pool9'"]),
    (["table", "{tiny}", "--train-per-class", "100", "--weights", "random"],
     ["--train-per-class 100 leaves no test image in class a"]),
    (["svm", "--layer", "pool"], ["no features cached"]),
    (["svm", "--model", "resnet50", "--cache", "{cache}"], ["holds no features for model resnet50",
                                                           "efficientnet_lite0-imagenet"]),
    (["svm", "--cache", "{cache}", "--layer", "pool,relu7"],
     ["efficientnet_lite0 has no layer 'relu7'", "its layers: stem,"]),
    (["svm", "--cache", "{cache}", "--layer", "pool,stem"], ["layer 'stem' is not in the cache",
                                                              "cached: stage7_pool, pool"]),
    (["table", "{tiny}", "--weights", "random", "--C", "abc"], ["--C must be a positive number"]),
    (["table", "{tiny}", "--weights", "missing.pth", "--train-per-class", "2"],
     ["weights file not found"]),
    (["table", "{tiny}", "--weights", "random", "--split", "nosplit.csv"], ["split file not found"]),
    (["predict", "nothing.jpg"], ["cannot read image nothing.jpg"]),
])
def test_bad_input_gets_one_clear_line_and_nonzero_exit(tmp_path, demo_workdir, args, needles) -> None:
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "oneclass", {"a": 3})
    (tmp_path / "noimages" / "b").mkdir(parents=True)
    write_images(tmp_path / "noimages", {"a": 2})
    write_images(tmp_path / "tiny", {"a": 3, "b": 3})
    places = {"empty": tmp_path / "empty", "noimages": tmp_path / "noimages",
              "tiny": tmp_path / "tiny", "cache": demo_workdir / "featx-cache",
              "oneclass": tmp_path / "oneclass"}
    filled = [a.format(**places) for a in args]
    assert_clean_error(run_cli(*filled, cwd=tmp_path), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_a_gpu_without_one_is_a_clear_error(tmp_path) -> None:
    write_images(tmp_path / "tiny", {"a": 3, "b": 3})
    result = run_cli("extract", str(tmp_path / "tiny"), "--weights", "random", "--device", "cuda",
                     cwd=tmp_path)
    assert_clean_error(result, "no CUDA GPU")


def test_every_command_has_help_with_examples(tmp_path) -> None:
    from featx.cli.app import app

    commands = [command.name or command.callback.__name__ for command in app.registered_commands]
    assert len(commands) >= 10
    for command in commands:
        result = run_cli(command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "Example" in result.stdout, command
        assert "featx-results//" not in result.stdout and "Default: .png" not in result.stdout


def test_the_installed_command_runs_and_lists_layers_without_torch(tmp_path) -> None:
    result = run_installed("--help", cwd=tmp_path)
    assert result.returncode == 0 and "layers" in result.stdout
    code = ("import sys; from featx.cli.main import main; code = main(['layers', '--model', 'vit_b_16']); "
            "assert code == 0; assert 'torch' not in sys.modules, 'torch was imported'")
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           check=False)
    assert probe.returncode == 0, probe.stderr
    assert "encoder_layer_11_cls" in probe.stdout and "ln_mean" in probe.stdout


def _documented_commands() -> list[tuple[str, str]]:
    """Every `featx ...` line of the README's and docs' code blocks and every example in the
    commands' help, with where it is shown."""
    import re

    from featx.cli.app import app

    lines = []
    for doc in [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = line.split("&&")[-1].strip()
                if command.startswith("featx "):
                    lines.append((doc.name, command))
    for command in app.registered_commands:
        text = " ".join((command.callback.__doc__ or "").split()).partition("Example")[2]
        lines += [(f"featx {command.callback.__name__} --help", example)
                  for example in re.findall(r"`(featx [^`]+)`", text)]
    return lines


def test_every_command_line_in_the_docs_and_the_help_parses() -> None:
    """Each names a command and options that exist, with values of the right kind (parsed, not
    run)."""
    import shlex

    import typer.main

    from featx.cli.app import app

    group = typer.main.get_command(app)
    lines = _documented_commands()
    assert len(lines) >= 40
    for doc, command in lines:
        name, *args = shlex.split(command, comments=True)[1:]
        assert name in group.commands, f"{doc}: {command}"
        try:
            group.commands[name].make_context(name, args, resilient_parsing=False)
        except Exception as exc:  # noqa: BLE001 - click's parse errors, named with the line
            raise AssertionError(f"{doc}: {command}: {exc}") from None


def test_the_documented_commands_on_the_demo_data_run_as_printed(tmp_path, demo_caches) -> None:
    import shlex

    (tmp_path / "data").symlink_to(REPO / "data")
    demo_caches.copy_to(tmp_path)
    demo = sorted({command for _, command in _documented_commands() if " data/demo" in command})
    assert len(demo) >= 4
    for command in demo:
        result = run_cli(*shlex.split(command, comments=True)[1:], cwd=tmp_path)
        assert result.returncode == 0, f"{command}: {result.stderr}"


@pytest.mark.slow
def test_the_quick_start_runs_as_printed_with_the_installed_command(tmp_path) -> None:
    """The README's first command, after its install step, in a fresh folder: the table, the
    figures and the page, with the best layer the README names."""
    import re
    import shlex

    block = re.search(r"## Quick start.*?```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    command = shlex.split(block.split("&&")[-1].strip())
    assert command[:3] == ["featx", "table", "data/demo"]
    (tmp_path / "data").symlink_to(REPO / "data")
    result = run_installed(*command[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "featx-results" / "demo" / "efficientnet_lite0-imagenet"
    assert (out / "table.md").is_file() and (out / "accuracy.png").is_file()
    assert (tmp_path / "demo-report.html").stat().st_size > 10_000
    best = re.search(r"best: (\w+) at ([0-9.]+)", (REPO / "README.md").read_text())
    assert re.search(rf"\| {best.group(1)} \| {best.group(2)} \|", result.stdout), result.stdout
