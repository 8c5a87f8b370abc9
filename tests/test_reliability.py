"""No silent wrong answer: the cache under changed, added, removed and replaced images, damaged
shards, concurrent runs, broken manifests, killed runs and awkward images. Each case ends with one
clear line or a correct result, and every shard it should not touch stays as it was."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featx.cache.store import FeatureStore

from conftest import CHEAP_FOLDER, CHEAP_RANDOM, assert_clean_error, run_cli, write_images

LITE_RANDOM = CHEAP_RANDOM
FOLDER = CHEAP_FOLDER


def shard_sums(store_folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store_folder.glob("pool/*.h5"))}


@pytest.fixture
def cached(tmp_path):
    """A dataset of 3 classes x 6 images cached in shards of 4 (pool layer), and a runner."""
    data = write_images(tmp_path / "data", {"a": 6, "b": 6, "c": 6})

    def featx(*args: str):
        return run_cli(*args, cwd=tmp_path)

    def extract(*extra: str):
        result = featx("extract", str(data), *LITE_RANDOM, "--layer", "pool", "--batch-size", "4",
                       "--shard-size", "4", "--workers", "0", *extra)
        assert result.returncode == 0, result.stderr
        return result

    extract()
    store = tmp_path / "featx-cache" / "data" / FOLDER
    return data, store, featx, extract


def _replace_pixels(path: Path, seed: int) -> None:
    """Another picture under the same file name: a smooth gradient instead of noise."""
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (64, 1))] * 3, axis=2) // (seed % 3 + 1)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def test_a_replaced_image_is_named_by_svm_and_only_its_shard_is_redone(cached) -> None:
    data, store, featx, extract = cached
    before, features = shard_sums(store), FeatureStore(store).read_layer("pool")
    _replace_pixels(data / "b" / "img_002.jpg", seed=99)  # row 8: shard 2
    refused = featx("svm", "--train-per-class", "2")
    assert_clean_error(refused, "changed since", "1 changed (b/img_002.jpg)", "run featx extract")
    result = extract()
    assert "1 changed (b/img_002.jpg)" in result.stderr and "4 images" in result.stderr
    after = shard_sums(store)
    assert {name for name in before if before[name] != after[name]} == {"shard-00002.h5"}
    now = FeatureStore(store).read_layer("pool")
    changed = np.flatnonzero((now.features != features.features).any(axis=1))
    assert changed.tolist() == [8]
    assert featx("svm", "--train-per-class", "2").returncode == 0


def test_removed_and_added_images_are_named_then_synced_without_touching_other_shards(cached) -> None:
    data, store, featx, extract = cached
    before = shard_sums(store)
    (data / "a" / "img_001.jpg").unlink()
    write_images(data.parent / "more", {"c": 8})
    (data.parent / "more" / "c" / "img_007.jpg").rename(data / "c" / "new.jpg")
    assert_clean_error(featx("svm", "--train-per-class", "2"), "1 added (c/new.jpg)",
                       "1 removed (a/img_001.jpg)")
    extract()
    after = shard_sums(store)
    assert {n for n in before if before[n] == after.get(n)} == {f"shard-0000{k}.h5" for k in range(4)}
    layer = FeatureStore(store).read_layer("pool")
    paths = FeatureStore(store).rows.paths(layer.index)
    assert "a/img_001.jpg" not in paths and paths[-1] == "c/new.jpg" and len(paths) == 18
    assert featx("svm", "--train-per-class", "2").returncode == 0


def _swap_in_place(path: Path) -> None:
    """Other bytes behind the same name, size and modification time."""
    stat, raw = path.stat(), bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    time.sleep(0.05)  # past the file system's clock tick: the change time moves
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_verify_hash_sees_new_bytes_behind_the_same_size_and_time(cached) -> None:
    data, store, featx, extract = cached
    assert "already cached" in extract("--verify",
                                       "hash").stderr  # every row's bytes were hashed when extracted
    assert FeatureStore(store).manifest.verify == "hash"
    _swap_in_place(data / "a" / "img_000.jpg")
    assert "already cached" in extract("--verify", "size").stderr  # size and time cannot see it
    assert_clean_error(featx("svm", "--train-per-class", "2"),
                       "1 changed (a/img_000.jpg)")  # the cache's own can
    assert "1 changed (a/img_000.jpg)" in extract().stderr
    assert featx("svm", "--train-per-class", "2").returncode == 0


def test_hash_verification_is_never_given_to_features_of_bytes_it_did_not_see(cached) -> None:
    data, store, featx, extract = cached
    rows = FeatureStore(store).rows
    rows.write("hash", np.arange(rows.count), np.zeros(rows.count, dtype="V16"))  # as a format-3 cache
    _swap_in_place(data / "a" / "img_000.jpg")
    result = extract("--verify", "hash")
    assert "18 changed" in result.stderr and "recognised by size and time only until now" in result.stderr
    assert "18 images, pool" in result.stderr  # extracted again from the bytes that are now hashed
    assert "already cached" in extract().stderr


@pytest.mark.parametrize("damage", ["flip", "truncate", "width"])
def test_a_damaged_shard_is_named_and_extract_writes_it_anew(cached, damage) -> None:
    data, store, featx, extract = cached
    before = shard_sums(store)
    reference = FeatureStore(store).read_layer("pool").features
    shard = store / "pool" / "shard-00001.h5"
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        with h5py.File(shard, "r") as f:
            offset = f["features"].id.get_chunk_info(0).byte_offset
        raw[offset + 10] ^= 0x01
        shard.write_bytes(bytes(raw))
    elif damage == "truncate":
        shard.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        with h5py.File(shard, "r+") as f:
            del f["features"]
            f.create_dataset("features", data=np.zeros((4, 7), np.float32))
    result = featx("svm", "--train-per-class", "2")
    assert_clean_error(result, str(shard), "is damaged", "run the same featx extract again")
    fixed = extract()
    assert f"{shard} is damaged" in fixed.stderr and "written again" in fixed.stderr
    assert shard_sums(store) == before
    assert np.array_equal(FeatureStore(store).read_layer("pool").features, reference)


def _rot(shard: Path) -> None:
    """One flipped bit in a shard's features, its size and modification time kept (bit rot)."""
    stat = shard.stat()
    with h5py.File(shard, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    raw = bytearray(shard.read_bytes())
    raw[offset + 10] ^= 0x01
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_shard_damaged_behind_its_size_and_time_is_found_when_read_then_written_anew(cached) -> None:
    data, store, featx, extract = cached
    before = shard_sums(store)
    _rot(store / "pool" / "shard-00002.h5")
    assert "already cached" in extract().stderr  # a no-op run reads no feature bytes
    assert_clean_error(featx("svm", "--train-per-class", "2"), "shard-00002.h5 is damaged")
    fixed = extract()
    assert "shard-00002.h5 is damaged" in fixed.stderr and "written again" in fixed.stderr
    assert shard_sums(store) == before and featx("svm", "--train-per-class", "2").returncode == 0


def test_verify_rechecks_every_shard_and_image_on_demand(cached) -> None:
    data, store, featx, extract = cached
    assert featx("verify").returncode == 0
    _rot(store / "pool" / "shard-00001.h5")
    _swap_in_place(data / "c" / "img_003.jpg")
    found = featx("verify", "--verify", "hash")
    assert_clean_error(found, "shard-00001.h5", "1 changed (c/img_003.jpg)")
    assert "1 of 5 shards damaged" in found.stdout
    extract("--verify", "hash")
    assert featx("verify").returncode == 0


def test_a_broken_manifest_is_passed_over_and_the_others_still_work(cached, tmp_path) -> None:
    data, store, featx, extract = cached
    other = write_images(tmp_path / "other", {"x": 4, "y": 4})
    assert featx("extract", str(other), *LITE_RANDOM, "--layer", "pool").returncode == 0
    for content in ("{not json", "{}"):
        (store / "manifest.json").write_text(content)
        result = featx("svm", "--train-per-class", "2")
        assert result.returncode == 0, result.stderr
        assert "passed over" in result.stderr and str(store) in result.stderr
        info = featx("info")
        assert info.returncode == 0 and "other/" in info.stdout and "passed over" in info.stdout


def test_concurrent_extracts_of_the_same_layer_do_the_work_once(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 24, "b": 24}, size=32)
    cache = tmp_path / "cache"
    lite = ["--model", "efficientnet_lite0", "--weights", "random"]  # a second of work: the second run waits
    args = [sys.executable, "-m", "featx", "extract", str(data), *lite, "--layer", "pool",
            "--cache", str(cache), "--workers", "0"]
    runs = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[1] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    joined = "\n".join(outputs)
    assert "waiting for it to finish" in joined and "already cached" in joined
    store = FeatureStore(cache / "data" / "efficientnet_lite0-random-seed0")
    assert [run.status for run in store.manifest.runs] == ["done"]


KILLED_RUN = """
import contextlib, json, os, sys, time
from pathlib import Path
from featx.data.scan import find_images
from featx.extract.run import ExtractOptions, extract_images

manifest = Path(sys.argv[2]) / "data" / "mobilenet_v3_small-random-seed0" / "manifest.json"

@contextlib.contextmanager
def progress(description):
    def advance(done, total):  # dies like a killed process once the run has noted its time
        runs = json.loads(manifest.read_text())["runs"]
        if runs[-1]["images"] > 0:
            os._exit(9)
        time.sleep(0.25)
    yield advance

extract_images(find_images(sys.argv[1]), "mobilenet_v3_small", ["pool"], weights="random", cache=sys.argv[2],
               options=ExtractOptions(batch_size=4, shard_size=4, workers=0), progress=progress)
"""


def test_a_killed_run_is_recorded_with_its_time_and_resumes_bit_for_bit(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 12, "b": 12}, size=32)
    cache = tmp_path / "cache"
    child = subprocess.run([sys.executable, "-c", KILLED_RUN, str(data), str(cache)], capture_output=True,
                           text=True, check=False)
    assert child.returncode == 9, child.stderr
    folder = cache / "data" / FOLDER
    killed = FeatureStore(folder).manifest.runs[0]
    assert killed.status == "running" and killed.seconds > 0 and 0 < killed.images < 24
    rerun = run_cli("extract", str(data), *LITE_RANDOM, "--layer", "pool", "--cache", str(cache),
                    cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    store = FeatureStore(folder)
    seconds, _ = store.feature_time("pool")
    assert seconds == pytest.approx(sum(run.seconds for run in store.manifest.runs))
    assert [run.status for run in store.manifest.runs] == ["running", "done"]
    assert not list(folder.rglob("*.tmp"))
    whole = run_cli("extract", str(data), *LITE_RANDOM, "--layer", "pool", "--cache", str(tmp_path / "whole"),
                    "--batch-size", "4", "--shard-size", "4", cwd=tmp_path)
    # the resumed cache holds what one whole run in the same batches writes, bit for bit
    assert whole.returncode == 0, whole.stderr
    assert np.array_equal(store.read_layer("pool").features,
                          FeatureStore(tmp_path / "whole" / "data" / FOLDER).read_layer("pool").features)


def test_awkward_images_are_decoded_within_bounds_or_named(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 3, "b": 3})
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (1, 20000, 3), dtype=np.uint8)).save(data / "a" / "thin.png")
    Image.new("RGB", (10000, 10000), (20, 120, 220)).save(data / "b" / "huge.jpg", quality=70)
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(3)]
    frames[0].save(data / "b" / "moving.gif", save_all=True, append_images=frames[1:])
    (data / "a" / "folder.jpg").mkdir()  # a folder with an image's name is not an image
    started = time.perf_counter()
    result = run_cli("extract", str(data), *LITE_RANDOM, "--layer", "pool", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - started < 60
    assert "b/moving.gif: 3 frames: the first one is used" in result.stderr
    store = FeatureStore(tmp_path / "featx-cache" / "data" / FOLDER)
    assert {"a/thin.png", "b/huge.jpg", "b/moving.gif"} <= set(store.rows.paths())
    assert "a/folder.jpg" not in store.rows.paths()
    assert store.manifest.skipped == {"a/folder.jpg": "a folder, not an image file"}
    assert "skipped a/folder.jpg: a folder, not an image file" in result.stderr
    assert store.manifest.notes == {"b/moving.gif": "3 frames: the first one is used"}


def test_two_datasets_with_one_name_get_two_caches(tmp_path) -> None:
    first = write_images(tmp_path / "one" / "test", {"a": 3, "b": 3})
    second = write_images(tmp_path / "two" / "test", {"x": 3, "y": 3}, seed=5)
    for data in (first, second):
        assert run_cli("extract", str(data), *LITE_RANDOM, "--layer", "pool", cwd=tmp_path).returncode == 0
    folders = sorted(p.name for p in (tmp_path / "featx-cache").iterdir())
    assert len(folders) == 2 and folders[0] == "test" and folders[1].startswith("test-")
    chosen = run_cli("svm", "--dataset", str(second), "--train-per-class", "1", "--C", "1", cwd=tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    assert "| pool |" in chosen.stdout
    assert_clean_error(run_cli("svm", "--dataset", "test", cwd=tmp_path), "holds several")


def test_the_default_split_falls_back_to_half_the_smallest_class_and_says_so(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 12, "b": 10})
    result = run_cli("table", str(data), *LITE_RANDOM, "--layer", "pool", "--C", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "5 training images per class (half of the smallest class, b with 10 images" in result.stdout


def test_a_disk_filling_up_during_a_run_is_one_line_and_keeps_the_shards_before(cached, monkeypatch) -> None:
    import errno

    from featx.cache import shards

    data, store, featx, extract = cached
    (store / "pool" / "shard-00003.h5").unlink()
    (store / "pool" / "shard-00004.h5").unlink()
    before = shard_sums(store)
    write = shards._write_h5

    def full_after_one(tmp, **kwargs):
        if tmp.name.startswith("shard-00004"):
            tmp.write_bytes(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "Driver write request failed")
        return write(tmp, **kwargs)

    monkeypatch.setattr(shards, "_write_h5", full_after_one)
    result = featx("extract", str(data), *LITE_RANDOM, "--layer", "pool", "--batch-size", "4",
                   "--shard-size", "4", "--workers", "0")
    assert result.returncode == 2
    assert_clean_error(result, "No space left on device", "shard-00004.h5.tmp")
    after = shard_sums(store)
    assert {name: after[name] for name in before} == before and "shard-00003.h5" in after
    assert not list(store.rglob("*.tmp"))
    monkeypatch.setattr(shards, "_write_h5", write)
    rerun = extract().stderr
    assert ": 2 images, pool" in rerun  # the rerun writes the one shard missing (rows 16 and 17)
    assert FeatureStore(store).read_layer("pool").index.tolist() == list(range(18))
