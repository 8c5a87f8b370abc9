"""A cache written by featx's format 3 (every row in manifest.json) is upgraded in place to format 4
on first use, and nothing extracted is lost or computed again. The fixture in tests/data/format3
was made by that featx: `featx extract images --model efficientnet_lite0 --weights random --layer
pool,stage7_pool --batch-size 4 --shard-size 4 --verify hash --precision fp32`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from featx.cache.store import FeatureStore

from conftest import run_cli

FIXTURE = Path(__file__).parent / "data" / "format3"
FOLDER = Path("cache") / "images" / "efficientnet_lite0-random-seed0"


@pytest.fixture
def old_cache(tmp_path) -> tuple[Path, Path, dict]:
    """The fixture where a user has it: the dataset's path and its files' times as the cache
    recorded them (git keeps neither)."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    manifest_path = root / FOLDER / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == 3
    manifest["dataset_root"] = str((root / "images").resolve())
    for path, (_, mtime, _) in zip(manifest["paths"], manifest["stats"]):
        os.utime(root / "images" / path, ns=(mtime, mtime))
    manifest_path.write_text(json.dumps(manifest))
    return root, root / FOLDER, manifest


def _sums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.h5"))}


def test_a_format_3_cache_is_upgraded_in_place_and_nothing_is_computed_again(old_cache) -> None:
    root, folder, old = old_cache
    shards = _sums(folder)
    result = run_cli("extract", "images", "--model", "efficientnet_lite0", "--weights", "random", "--layer",
                     "pool,stage7_pool", "--precision", "fp32", "--cache", "cache", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "upgraded the cache" in result.stderr and "already cached" in result.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == 4 and "paths" not in manifest and manifest["rows"] == len(old["paths"])
    assert _sums(folder) == shards  # every shard kept as it was
    store = FeatureStore(folder)
    assert store.rows.paths() == old["paths"] and store.labels.tolist() == old["labels"]
    assert store.manifest.verify == "hash"  # the old cache hashed its images: so does the new one
    assert [bytes(h).hex() for h in store.rows.hashes()] == [s[2] for s in old["stats"]]
    assert [run.status for run in store.manifest.runs] == [run["status"] for run in old["runs"]]
    assert store.feature_time("pool")[0] == pytest.approx(old["runs"][0]["seconds"])


def test_an_upgraded_cache_scores_the_features_the_old_one_held(old_cache) -> None:
    root, folder, _ = old_cache
    import h5py

    with h5py.File(folder / "pool" / "shard-00000.h5") as f:
        old_features = f["features"][...]
    result = run_cli("svm", "--cache", "cache", "--train-per-class", "1", "--C", "1", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "| pool |" in result.stdout and "| stage7_pool |" in result.stdout
    assert np.array_equal(FeatureStore(folder).read_layer("pool").features[:4], old_features)
