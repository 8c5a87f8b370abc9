"""Shared fixtures: the embedded demo set, small temporary datasets and the real 15-Scene copy."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
SHARED_DATA = Path(os.environ.get("FEATX_SHARED_DATA", REPO.parent / "shared" / "data"))
# A torchvision network about eight times cheaper than efficientnet_lite0, for tests of the cache,
# the inputs and the ranks, where which network computes the features does not matter.
CHEAP = "mobilenet_v3_small"
CHEAP_RANDOM = ["--model", CHEAP, "--weights", "random"]
CHEAP_FOLDER = f"{CHEAP}-random-seed0"

if os.environ.get("PYTEST_XDIST_WORKER"):  # test processes share the cores: one thread each, as do
    os.environ["OMP_NUM_THREADS"] = "1"     # the featx processes they start
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def user_catalog(tmp_path_factory) -> Path:
    """Tables derived live are remembered here, not in the home folder of whoever runs the tests."""
    home = tmp_path_factory.mktemp("featx-home")
    os.environ["FEATX_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    assert DEMO.is_dir(), "data/demo is missing: run python data/make_demo.py"
    return DEMO


class DemoCaches:
    """The demo set's four standard efficientnet_lite0 layers, extracted at most once per test run
    for each weight set; `copy_to(work)` makes them `work/featx-cache`, as if extracted there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[str, Path] = {}

    def copy_to(self, work: Path, weights: str = "imagenet") -> Path:
        if weights not in self.made:
            place = self.root / weights
            place.mkdir()
            result = run_cli("extract", str(DEMO), "--model", "efficientnet_lite0", "--weights", weights,
                             cwd=place)
            assert result.returncode == 0, result.stderr
            self.made[weights] = place / "featx-cache"
        shutil.copytree(self.made[weights], work / "featx-cache", dirs_exist_ok=True)  # times kept
        return work


@pytest.fixture(scope="session")
def demo_caches(tmp_path_factory) -> DemoCaches:
    return DemoCaches(tmp_path_factory.mktemp("demo-caches"))


def write_images(folder: Path, classes: dict[str, int], size: int = 64, seed: int = 0) -> Path:
    """A small dataset of random-noise JPEGs: {class name: image count}."""
    rng = np.random.default_rng(seed)
    for cls, count in classes.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"img_{i:03d}.jpg", quality=90)
    return folder


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_images(tmp_path / "tiny", {"a": 5, "b": 5, "c": 4})


@pytest.fixture
def demo_copy(tmp_path: Path, demo_dir: Path) -> Path:
    target = tmp_path / "demo"
    shutil.copytree(demo_dir, target)
    return target


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `featx ARGS` in this process (the same entry point the command calls), in `cwd`
    with ./featx-cache as the cache; stdout and stderr are captured as a user would see them."""
    from featx.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    os.environ.update({"FEATX_CACHE": str(cwd / "featx-cache"), **(env or {})})
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["featx", *args], code, out.getvalue(), err.getvalue())


def run_installed(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `featx` entry point in a fresh process, as a user would."""
    full_env = {**os.environ, "FEATX_CACHE": str(cwd / "featx-cache"), **(env or {})}
    command = shutil.which("featx", path=str(Path(sys.executable).parent)) or "featx"
    return subprocess.run([command, *args], cwd=cwd, env=full_env, check=False,
                          capture_output=True, text=True, timeout=900)


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, one 'featx: error:' line, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("featx: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def array_store(root: Path, layers: dict[str, np.ndarray], labels: np.ndarray, shard_size: int = 16,
                missing: tuple[int, ...] = (), dtype: str = "float32"):
    """A cache holding these arrays (rows in `missing` absent, as unreadable images are), stored
    as `dtype`."""
    from featx.cache.store import FeatureStore

    classes = tuple(f"c{i}" for i in range(int(labels.max()) + 1))
    store = FeatureStore.for_arrays(root, "arrays", labels, classes=classes,
                                    layers={name: x.shape[1] for name,
                                            x in layers.items()}, dtype=dtype, shard_size=shard_size)
    for name, x in layers.items():
        for k, (start, stop) in enumerate(store.shard_ranges(name)):
            rows = np.array([i for i in range(start, stop) if i not in missing], dtype=np.int64)
            store.write_shard(name, k, rows, features=x[rows], skipped={})
    return FeatureStore(store.folder)


def read_predictions(out: Path, layer: str) -> list[dict[str, str]]:
    """The rows of `<layer>.predictions.csv` in a results folder: split, path, true and one column
    per probe."""
    import csv

    with open(Path(out) / f"{layer}.predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def problem(n_per_class: int = 30, dim: int = 400, classes: int = 3, *, seed: int = 0,
            separation: float = 0.4):
    """Gaussian classes around random centres (float32 rows, labels) and a seeded split with half of
    each class for training: a probe's test problem."""
    from featx.data.splits import seeded_split

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    features = (centres[labels] * separation + rng.normal(0, 1, (len(labels), dim))).astype(np.float32)
    split = seeded_split(labels, tuple(f"c{i}" for i in range(classes)), n_per_class // 2, seed=seed)
    return features, labels, split
