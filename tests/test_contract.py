"""The CLI's contract: every bad input is one `featx: error:` line and exit 2, never a traceback,
and the cache is left as it was; unwritable places are named; Ctrl-C and SIGTERM stop cleanly
(exit 130 and 143, no process left behind) and the rerun ends bit-identical; an internal error
is one line with a log file; links in a dataset follow one stated rule."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featx.cache.store import FeatureStore

from conftest import assert_clean_error, run_cli, write_images

LITE_RANDOM = ["--model", "efficientnet_lite0", "--weights", "random"]


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset, a cache holding its pool layer, and files of every wrong kind."""
    root = tmp_path_factory.mktemp("contract")
    tiny = write_images(root / "tiny", {"a": 4, "b": 4})
    result = run_cli("extract", str(tiny), *LITE_RANDOM, "--layer", "pool", cwd=root)
    assert result.returncode == 0, result.stderr
    write_images(root / "oneclass", {"a": 3})
    (root / "empty").mkdir()
    (root / "noimages" / "b").mkdir(parents=True)
    write_images(root / "noimages", {"a": 2})
    (root / "file.txt").write_text("not a folder, not an image, not a state dict")
    (root / "notes.pth").write_text("not a state dict")
    torch.save({"fc.weight": torch.zeros(2, 2)}, root / "wrong.pth")
    (root / "cols.csv").write_text("file,class\na/img_000.jpg,a\n")
    (root / "odd.csv").write_text("path,label,split\na/img_000.jpg,a,val\n")
    (root / "unrelated.csv").write_text("path,label,split\nz/none.jpg,z,train\n")
    (root / "notutf8.csv").write_bytes(b"path,label,split\na/img_000.jpg,a,train\nb/caf\xe9.jpg,b,test\n")
    every = [f"{c}/img_{i:03d}.jpg" for c in "ab" for i in range(4)]
    (root / "notrain.csv").write_text("path,label,split\n" + "".join(f"{p},x,train\n" for p in every))
    (root / "untrained.csv").write_text("path,label,split\n" + "".join(
        f"{p},x,{'train' if p.startswith('a/') and p != 'a/img_003.jpg' else 'test'}\n" for p in every))
    (root / "bad.json").write_text("{not json")
    (root / "other.json").write_text('{"hello": 1}')
    (root / "emptycache").mkdir()
    (root / "adir").mkdir()
    return {"root": root, "tiny": tiny, "cache": root / "featx-cache",
            "image": tiny / "a" / "img_000.jpg"}


BAD = [
    # extract
    (["extract", "no/such/folder"], "dataset folder not found"),
    (["extract", "{root}/file.txt"], "not a folder"),
    (["extract", "{root}/empty"], "no class folders"),
    (["extract", "{root}/oneclass"], "has one class"),
    (["extract", "{root}/noimages"], "has no images"),
    (["extract", "{tiny}", "--model", "vgg99"], "unknown model 'vgg99'"),
    (["extract", "{tiny}", "--model", "resnet50", "--weights", "IMAGENET9K"], "no weights 'IMAGENET9K'"),
    (["extract", "{tiny}", "--model", "efficientnet_lite0", "--layer", "pool9"], "unknown layer 'pool9'"),
    (["extract", "{tiny}", "--model", "efficientnet_lite0", "--weights", "missing.pth"],
     "weights file not found"),
    (["extract", "{tiny}", "--model", "efficientnet_lite0", "--weights", "{root}/notes.pth"],
     "cannot read weights file"),
    (["extract", "{tiny}", "--model", "efficientnet_lite0", "--weights", "{root}/wrong.pth"], "do not fit"),
    (["extract", "{tiny}", *LITE_RANDOM, "--batch-size", "0"], "--batch-size must be"),
    (["extract", "{tiny}", *LITE_RANDOM, "--batch-size", "-5"], "--batch-size must be"),
    (["extract", "{tiny}", *LITE_RANDOM, "--batch-size", "x"], "--batch-size"),
    (["extract", "{tiny}", *LITE_RANDOM, "--shard-size", "0"], "--shard-size must be"),
    (["extract", "{tiny}", *LITE_RANDOM, "--workers", "-1"], "--workers must be"),
    (["extract", "{tiny}", *LITE_RANDOM, "--workers", "100000"],
     "the cores and memory of this machine allow"),
    (["extract", "{tiny}", *LITE_RANDOM, "--batch-size", "100000"],
     "--batch-size must be a whole number from 1"),
    (["extract", "{tiny}", *LITE_RANDOM, "--shard-size", "10000000"], "--shard-size must be a whole number"),
    (["extract", "{tiny}", *LITE_RANDOM, "--max-pixels", "10"], "--max-pixels must be a whole number"),
    (["extract", "{tiny}", *LITE_RANDOM, "--verify", "crc"], "--verify must be one of size, hash"),
    (["extract", "{tiny}", *LITE_RANDOM, "--tta", "rotate"], "--tta must be one of none, flip"),
    (["extract", "{tiny}", *LITE_RANDOM, "--seed", "-1"], "--seed must be a whole number from 0"),
    (["extract", "{tiny}", *LITE_RANDOM, "--precision", "fp8"], "--precision must be one of"),
    (["extract", "{tiny}", *LITE_RANDOM, "--dtype", "int8"], "--dtype must be one of"),
    (["extract", "{tiny}", *LITE_RANDOM, "--decode", "gpu"], "--decode must be one of"),
    (["table", "{tiny}", *LITE_RANDOM, "--decode", "nvjpeg"], "--decode must be one of"),
    (["extract", "{tiny}", *LITE_RANDOM, "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["extract", "{tiny}", *LITE_RANDOM, "--cache", "{root}/file.txt"], "--cache"),
    (["extract", "{tiny}", *LITE_RANDOM, "--cache", "{root}/file.txt/sub"], "--cache"),
    (["extract", "{tiny}", "--bogus"], "No such option"),
    (["probes", "--bogus"], "No such option"),
    (["extract"], "Missing argument"),
    # svm
    (["svm", "--cache", "{cache}", "--layer", "relu7"], "has no layer 'relu7'"),
    (["svm", "--cache", "{cache}", "--layer", "stem"], "layer 'stem' is not in the cache"),
    (["svm", "--cache", "{cache}", "--C", "abc"], "--C must be a positive number"),
    (["svm", "--cache", "{cache}", "--C", "-1"], "--C must be a positive"),
    (["svm", "--cache", "{cache}", "--C", "0"], "--C must be a positive"),
    (["svm", "--cache", "{cache}", "--C", "nan"], "--C must be a positive finite"),
    (["svm", "--cache", "{cache}", "--C", "inf"], "--C must be a positive finite"),
    (["svm", "--cache", "{cache}", "--C", "1e300"], "--C must lie between 1e-06 and 1e+06"),
    (["svm", "--cache", "{cache}", "--scaling", "cube"], "--scaling must be one of"),
    (["svm", "--cache", "{cache}", "--train-per-class", "0"], "--train-per-class must be"),
    (["svm", "--cache", "{cache}", "--train-per-class", "100"], "--train-per-class 100 leaves no test"),
    (["svm", "--cache", "{cache}", "--splits", "0"], "--splits must be"),
    (["svm", "--cache", "{cache}", "--splits", "1000000"], "--splits must be a whole number from 1 to 100"),
    (["svm", "--cache", "{cache}", "--train-per-class", "1000000000"], "whole numbers from 1 to 1000000"),
    (["svm", "--cache", "{cache}", "--memory", "1000T"], "more than this machine's"),
    (["svm", "--cache", "{cache}", "--probe", "knn", "--probe-option", "knn.k=0"], "knn.k must be a whole"),
    (["svm", "--cache", "{cache}", "--probe", "knn", "--probe-option", "knn.depth=3"],
     "knn has no parameter"),
    (["svm", "--cache", "{cache}", "--probe-option", "knn.k=5"], "which --probe does not name"),
    (["svm", "--cache", "{cache}", "--probe-option", "k=5"], "must be PROBE.PARAM=VALUE"),
    (["svm", "--cache", "{cache}", "--verify", "crc"], "--verify must be one of size, hash"),
    (["svm", "--cache", "{cache}", "--tta", "flip"], "holds no features for tta flip"),
    (["svm", "--cache", "{cache}", "--split", "{root}/notutf8.csv"], "line 3 has bytes that are not UTF-8"),
    (["svm", "--cache", "{cache}", "--split", "{root}/notrain.csv"], "leaves no test image"),
    (["svm", "--cache", "{cache}", "--split", "{root}/untrained.csv"], "tests 1 class it has no training"),
    (["similarity", "--cache", "{cache}", "--dtype", "float16"], "holds no features for dtype float16"),
    (["svm", "--cache", "{cache}", "--probe", "forest"], "--probe must be among"),
    (["svm", "--cache", "{cache}", "--probe", "svm,,tree"], "--probe must be among"),
    (["svm", "--cache", "{cache}", "--solver", "sgd"], "--solver must be one of"),
    (["svm", "--cache", "{cache}", "--memory", "lots"], "--memory must be a size"),
    (["svm", "--cache", "{cache}", "--memory", "10M"], "--memory must be at least"),
    (["svm", "--cache", "{cache}", "--device", "tpu"], "--device must be"),
    (["svm", "--cache", "{cache}", "--threads", "0"], "--threads must be a whole number from 1 to"),
    (["svm", "--cache", "{cache}", "--threads", "x"], "--threads"),
    (["similarity", "--cache", "{cache}", "--memory", "2 pints"], "--memory must be a size"),
    (["similarity", "--cache", "{cache}", "--device", "gpu0"], "--device must be"),
    (["svm", "--cache", "{cache}", "--device", "cuda:0"], "no CUDA GPU is available"),
    (["svm", "--cache", "{cache}", "--split", "missing.csv"], "split file not found"),
    (["svm", "--cache", "{cache}", "--split", "{root}/cols.csv"], "needs the columns path,label,split"),
    (["svm", "--cache", "{cache}", "--split", "{root}/odd.csv"], "split must be train or test"),
    (["svm", "--cache", "{cache}", "--split", "{root}/unrelated.csv"], "no path of split file"),
    (["svm", "--cache", "{cache}", "--split", "{root}/adir"], "split file not found"),
    (["svm", "--cache", "{cache}", "--model", "resnet50"], "holds no features for model resnet50"),
    (["svm", "--cache", "{cache}", "--weights", "IMAGENET1K_V2"], "holds no features for weights"),
    (["svm", "--cache", "{cache}", "--dataset", "other"], "holds no features for dataset other"),
    (["svm", "--cache", "{root}/emptycache"], "no features cached"),
    (["svm", "--cache", "{root}/file.txt"], "is a file, not a folder"),
    (["svm", "--cache", "{cache}", "--train-per-class", "2", "--out", "{root}/file.txt"], "--out"),
    # table
    (["table", "{tiny}", *LITE_RANDOM, "--C", "-1"], "--C must be a positive"),
    (["table", "{tiny}", "--model", "vgg99", "--train-per-class", "2"], "unknown model"),
    (["table", "{tiny}", *LITE_RANDOM, "--train-per-class", "100"], "leaves no test image"),
    (["table", "{tiny}", *LITE_RANDOM, "--train-per-class", "2", "--html", "{root}/adir"],
     "--html {root}/adir is a folder"),
    (["table", "{tiny}", *LITE_RANDOM, "--train-per-class", "2", "--out", "{root}/file.txt/x"], "--out"),
    (["table", "{tiny}", *LITE_RANDOM, "--split", "missing.csv"], "split file not found"),
    (["table", "{tiny}", *LITE_RANDOM, "--splits", "-1"], "--splits must be"),
    (["table", "{tiny}", *LITE_RANDOM, "--probe", "svm,lda"], "--probe must be among"),
    (["table", "{tiny}", *LITE_RANDOM, "--memory", "-2G"], "--memory must be a size"),
    (["table", "{tiny}", *LITE_RANDOM, "--threads", "100000"], "--threads must be a whole number from 1 to"),
    (["table", "{root}/oneclass", *LITE_RANDOM, "--C", "1"], "has one class"),
    # layers, models
    (["layers", "--model", "vgg99"], "unknown model"),
    (["layers", "--model", "resnet50", "--weights", "IMAGENET9K"], "no weights 'IMAGENET9K'"),
    (["layers", "--model", "timm:resnet18.no_such_tag"], "no pretrained tag 'no_such_tag'"),
    (["models", "--bogus"], "No such option"),
    # predict
    (["predict", "nothing.jpg"], "cannot read image nothing.jpg"),
    (["predict", "{root}/file.txt"], "cannot read image"),
    (["predict", "{image}", "--top", "0"], "--top must be a whole number from 1 to 1000"),
    (["predict", "{image}", "--top", "5000"], "--top must be a whole number from 1 to 1000"),
    (["predict", "{image}", "--model", "vgg16", "--weights", "IMAGENET1K_FEATURES"], "carry no class names"),
    # plot, report, info
    (["plot", "missing.json"], "no report JSON"),
    (["plot", "{root}/bad.json"], "not a featx report JSON"),
    (["plot", "{root}/other.json"], "not a featx report JSON"),
    (["report", "{root}/adir"], "no report JSON"),
    (["info", "nowhere"], "no featx cache under nowhere"),
    (["info", "{root}/file.txt"], "no featx cache under"),
    (["info", "--cache", "nowhere"], "no featx cache under nowhere"),
    (["info", "{root}/adir", "--cache", "{root}/emptycache"], "--cache is"),
    (["verify", "--cache", "{root}/emptycache"], "no featx cache under"),
    (["verify", "--cache", "{cache}", "--model", "resnet50"], "holds no features for model resnet50"),
    (["verify", "--cache", "{cache}", "--verify", "crc"], "--verify must be one of size, hash"),
    # activations
    (["activations", "missing.jpg", "--model", "efficientnet_lite0", "--layer", "stem"], "cannot read image"),
    (["activations", "{image}", "--model", "efficientnet_lite0", "--layer", "pool"], "has no spatial maps"),
    (["activations", "{image}", "--model", "efficientnet_lite0", "--layer", "pool9"], "unknown layer"),
    (["activations", "{image}", "--model", "efficientnet_lite0", "--layer", "stem", "--channels", "0"],
     "--channels must be a whole number from 1 to 1024"),
    (["activations", "{image}", "--model", "efficientnet_lite0", "--layer", "stem", "--channels", "100000"],
     "--channels must be a whole number from 1 to 1024"),
    (["activations", "{image}", "--model", "efficientnet_lite0", "--layer", "stem", "--out", "{root}/x.txt"],
     "must end in .png, .svg, .pdf"),
    (["activations", "{image}", "--model", "efficientnet_lite0", "--layer", "stem", "--out",
      "{root}/file.txt/x.png"], "--out"),
    (["activations", "{image}", "--model", "efficientnet_lite0", "--layer", "stem", "--out", "{root}/adir"],
     "--out {root}/adir is a folder"),
    (["similarity", "--cache", "{cache}", "--layer", "pool"], "at least two layers"),
    (["similarity", "--cache", "{cache}", "--layer", "pool,stem"], "layer 'stem' is not in the cache"),
    (["similarity", "--cache", "{root}/emptycache"], "no features cached"),
    # export
    (["export", "--cache", "{cache}", "--layer", "pool", "--out", "{root}/x.txt"], "has no suffix"),
    (["export", "--cache", "{cache}", "--layer", "pool", "--out", "{root}/x.npy", "--format", "xls"],
     "--format must be one of npy, npz"),
    (["export", "--cache", "{cache}", "--layer", "stem", "--out", "{root}/x.npy"],
     "layer 'stem' is not in the cache"),
    (["export", "--cache", "{cache}", "--layer", "pool", "--out", "{root}/file.txt/x.npy"],
     "a file is in the way"),
    (["export", "--cache", "{cache}", "--layer", "pool", "--out", "{root}/x.npy", "--split",
      "{root}/odd.csv"], "split must be train or test"),
    (["nothing"], "No such command 'nothing'"),
]


def test_the_battery_has_at_least_60_bad_invocations_over_every_command() -> None:
    from featx.cli.app import app

    commands = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert len(BAD) >= 60
    assert commands <= {args[0] for args, _ in BAD}


@pytest.mark.parametrize("args, needle", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_the_cache_is_untouched(place, args, needle) -> None:
    if "--model" in args and args[args.index("--model") + 1].startswith("timm:"):
        pytest.importorskip("timm")
    before = checksums(place["cache"])
    fill = {k: str(v) for k, v in place.items()}
    result = run_cli(*[a.format(**fill) for a in args], cwd=place["root"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert_clean_error(result, needle.format(**fill))
    assert checksums(place["cache"]) == before


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.one_of(st.integers(-3, 40), st.text(max_size=4)),
       shard=st.one_of(st.integers(-3, 40), st.sampled_from(["", "1e3", "x"])),
       workers=st.integers(-2, 2),
       C=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5)),
       per_class=st.integers(-2, 5), splits=st.integers(-2, 3),
       out=st.sampled_from(["res", "file.txt", "file.txt/x", "adir", "", "."]))
def test_random_option_values_never_end_in_a_traceback(place, batch, shard, workers, C, per_class,
                                                       splits, out) -> None:
    before = checksums(place["cache"])
    with tempfile.TemporaryDirectory() as scratch:
        result = run_cli("table", str(place["tiny"]), *LITE_RANDOM, "--layer", "pool",
                         "--batch-size", str(batch), "--shard-size", str(shard), "--workers", str(workers),
                         "--C", str(C), "--train-per-class", str(per_class), "--splits", str(splits),
                         "--out", str(place["root"] / out) if out else "", "--cache", scratch,
                         cwd=place["root"])
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 2), result.stderr
    if result.returncode == 2:
        assert_clean_error(result)
    assert checksums(place["cache"]) == before


# --- places featx cannot write -----------------------------------------------------------------

def _without_root_override() -> list[str]:
    """A prefix that runs a command as root without the power to ignore permission bits (root
    writes anywhere otherwise); nothing when not root, where the bits already bind."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root, and setpriv (util-linux) is missing to drop the override")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def _featx_bound_by_permissions(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEATX_HOME": str(cwd / "home"), "MPLCONFIGDIR": str(cwd / "mpl"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*_without_root_override(), sys.executable, "-m", "featx", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("where, args", [
    ("cache", ["extract", "{data}", *LITE_RANDOM, "--layer", "pool", "--cache", "{place}"]),
    ("out", ["table", "{data}", *LITE_RANDOM, "--layer", "pool", "--C", "1", "--train-per-class", "2",
             "--cache", "{scratch}/cache", "--out", "{place}/results"]),
    ("html", ["table", "{data}", *LITE_RANDOM, "--layer", "pool", "--C", "1", "--train-per-class", "2",
              "--cache", "{scratch}/cache", "--html", "{place}/page.html"]),
])
def test_a_permission_denied_place_is_named_before_any_work(tmp_path, where, args) -> None:
    write_images(tmp_path / "data", {"a": 3, "b": 3})
    (tmp_path / "scratch").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    filled = [a.format(data=tmp_path / "data", place=locked, scratch=tmp_path / "scratch") for a in args]
    result = _featx_bound_by_permissions(filled, tmp_path)
    assert_clean_error(result, f"--{where}", str(locked), "Permission denied")
    assert result.returncode == 2
    assert not any((tmp_path / "scratch").rglob("*.h5"))  # refused before the forward pass


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` for the test (a read-only or a tiny one); skipped where this
    machine does not let the tests mount."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"this machine does not let the tests mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_read_only_filesystem_is_named(tmp_path) -> None:
    write_images(tmp_path / "data", {"a": 3, "b": 3})
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        result = run_cli("extract", str(tmp_path / "data"), *LITE_RANDOM, "--cache", str(mount / "c"),
                         cwd=tmp_path)
        assert_clean_error(result, "--cache", str(mount), "Read-only file system")


def test_a_full_disk_is_named_and_leaves_no_partial_shard(tmp_path) -> None:
    write_images(tmp_path / "data", {"a": 3, "b": 3})
    with tmpfs(tmp_path / "small", "size=300k") as mount:
        args = ["extract", str(tmp_path / "data"), *LITE_RANDOM, "--layer", "head",
                "--cache", str(mount / "c"), "--workers", "0"]
        result = subprocess.run([sys.executable, "-m", "featx", *args], capture_output=True, text=True,
                                check=False, cwd=tmp_path)
        assert result.returncode == 2, result.stderr  # not a crash of the HDF5 library
        assert_clean_error(result, "No space left on device", str(mount))
        assert not list(mount.rglob("*.h5")) and not list(mount.rglob("*.tmp"))


def test_a_read_only_cache_still_serves_what_it_holds(place, tmp_path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(place["cache"], cache)
    for path in [cache, *cache.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        args = ["table", str(place["tiny"]), *LITE_RANDOM, "--layer", "pool", "--C", "1",
                "--train-per-class", "2", "--cache", str(cache), "--out", str(tmp_path / "out")]
        result = _featx_bound_by_permissions(args, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "already cached" in result.stderr
    finally:
        for path in [cache, *cache.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


# --- internal errors ------------------------------------------------------------------------------

def test_an_internal_error_is_one_line_with_a_log_file(place, monkeypatch) -> None:
    import featx.study

    def broken(*args, **kwargs):
        raise RuntimeError("something featx did not expect")

    monkeypatch.setattr(featx.study, "run_table", broken)
    result = run_cli("table", str(place["tiny"]), *LITE_RANDOM, cwd=place["root"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("featx: internal error: RuntimeError: something featx did not expect")
    log = Path(line.split("the traceback is in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "something featx did not expect" in log.read_text()
    log.unlink()
    debug = run_cli("table", str(place["tiny"]), *LITE_RANDOM, cwd=place["root"], env={"FEATX_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# --- Ctrl-C and SIGTERM ------------------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def signal_data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("signal") / "data", {"a": 24, "b": 24}, size=32)


SIGNAL_ARGS = [*LITE_RANDOM, "--layer", "pool", "--batch-size", "4", "--shard-size", "4", "--workers", "1",
               "--precision", "fp32"]


@pytest.fixture(scope="module")
def whole_run(signal_data) -> np.ndarray:
    cache = signal_data.parent / "whole"
    result = run_cli("extract", str(signal_data), *SIGNAL_ARGS, "--cache", str(cache), cwd=cache.parent)
    assert result.returncode == 0, result.stderr
    return FeatureStore(cache / "data" / "efficientnet_lite0-random-seed0").read_layer("pool").features


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_a_signal_mid_extraction_stops_cleanly_and_the_rerun_is_identical(tmp_path, signal_data, whole_run,
                                                                          sig, code, word) -> None:
    cache = tmp_path / "cache"
    args = ["extract", str(signal_data), *SIGNAL_ARGS, "--cache", str(cache)]
    process = subprocess.Popen([sys.executable, "-m", "featx", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    layer_dir = cache / "data" / "efficientnet_lite0-random-seed0" / "pool"
    deadline = time.time() + 300
    while not (layer_dir / "shard-00002.h5").exists() and time.time() < deadline:
        time.sleep(0.02)
    children = _children(process.pid)
    assert children, "the decoding worker should be running"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"featx: {word}{' (SIGTERM)' if sig == signal.SIGTERM else ''}; completed shards are kept and "
        "the next run resumes")
    deadline = time.time() + 10
    while any(_alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children), "a decoding worker outlived featx"
    assert not list(cache.rglob("*.tmp"))
    done = sorted(layer_dir.glob("shard-*.h5"))
    assert 3 <= len(done) < 12, "the signal should land mid-run"

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    store = FeatureStore(layer_dir.parent)
    assert np.array_equal(store.read_layer("pool").features, whole_run)


# --- concurrent runs and links ----------------------------------------------------------------------

def test_two_concurrent_extracts_of_different_layers_keep_both(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 12, "b": 12}, size=32)
    cache = tmp_path / "cache"
    runs = [subprocess.Popen([sys.executable, "-m", "featx", "extract", str(data), *LITE_RANDOM,
                              "--layer", layer, "--cache", str(cache), "--workers", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for layer in ("pool", "stage6_pool")]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0 and "Traceback" not in stderr, stderr
    store = FeatureStore(cache / "data" / "efficientnet_lite0-random-seed0")
    assert set(store.complete_layers()) == {"pool", "stage6_pool"}
    assert {tuple(run.layers) for run in store.manifest.runs} == {("pool",), ("stage6_pool",)}


def test_links_follow_one_rule_and_every_skipped_link_is_named(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 3, "b": 3})
    outside = write_images(tmp_path / "outside", {"x": 2, "y": 1}, seed=1)
    (data / "a" / "linked.jpg").symlink_to(outside / "y" / "img_000.jpg")  # followed
    (data / "a" / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (data / "b" / "again.jpg").symlink_to(data / "a" / "img_000.jpg")  # the same file twice
    (data / "b" / "sub").symlink_to(outside / "y", target_is_directory=True)
    (data / "c").symlink_to(outside / "x", target_is_directory=True)  # a class folder that is a link
    result = run_cli("table", str(data), *LITE_RANDOM, "--layer", "pool", "--C", "1",
                     "--train-per-class", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "featx-results" / "data" / "efficientnet_lite0-random-seed0" /
                         "table.json").read_text())
    assert set(report["skipped"]) == {"a/broken.jpg", "b/again.jpg", "b/sub"}
    assert "the same file as a/img_000.jpg" in report["skipped"]["b/again.jpg"]
    for path in report["skipped"]:
        assert f"skipped {path}" in result.stderr
    store = FeatureStore(tmp_path / "featx-cache" / "data" / "efficientnet_lite0-random-seed0")
    assert "a/linked.jpg" in store.rows.paths() and store.classes == ("a", "b", "c")
    assert sum(p.startswith("c/") for p in store.rows.paths()) == 2
