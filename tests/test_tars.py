"""Tar shards in WebDataset's layout as input: the same features as the same images in a folder,
labels from .cls, .txt or the key's folder, the same skipping and resume rules, per tar."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from featx.cache.store import FeatureStore
from featx.data.scan import find_images
from featx.errors import FeatxError
from featx.extract.run import ExtractOptions, extract_images

from conftest import CHEAP, CHEAP_RANDOM, assert_clean_error, run_cli, write_images

OPTIONS = ExtractOptions(device="cpu", workers=0, shard_size=8, batch_size=4)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def to_tars(folder: Path, out: Path, shards: int = 3, label: str = "folder") -> str:
    """The images of a class-folder dataset as `shards` tars; labels as the key's folder, or as
    .cls (class number) or .txt (class name) members beside flat keys."""
    images = find_images(folder)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        with tarfile.open(out / f"part-{k:06d}.tar", "w") as tar:
            for i in range(k, len(images), shards):
                rel = images.paths[i]
                data = (folder / rel).read_bytes()
                if label == "folder":
                    _add(tar, rel, data)
                    continue
                key = f"sample{i:05d}"
                _add(tar, f"{key}.jpg", data)
                text = str(images.labels[i]) if label == "cls" else images.classes[images.labels[i]]
                _add(tar, f"{key}.{label}", text.encode())
    return str(out / f"part-{{000000..{shards - 1:06d}}}.tar")


def _by_image(store: FeatureStore, images, layer: str = "pool") -> dict[str, np.ndarray]:
    """Each image's features, keyed by the image file's bytes (the same image in tar and folder)."""
    features = store.read_layer(layer)
    return {images.read_bytes(int(i)): row for i, row in zip(features.index, features.features)}


@pytest.fixture
def small(tmp_path) -> Path:
    return write_images(tmp_path / "small", {"a": 8, "b": 8, "c": 8})


@pytest.mark.parametrize("decode", ["pil", "device"])
def test_tar_shards_give_the_features_of_the_same_images_in_a_folder(tmp_path, small, decode) -> None:
    pattern = to_tars(small, tmp_path / "tars")
    tars, folder = find_images(pattern), find_images(small)
    assert tars.name == "part" and len(tars) == len(folder) and tars.classes == folder.classes
    assert tars.paths[0] == "part-000000.tar/a/img_000.jpg"
    options = ExtractOptions(device="cpu", workers=0, shard_size=8, batch_size=4, decode=decode)
    from_tars = extract_images(tars, CHEAP, ["pool"], weights="random", cache=tmp_path / "c", options=options,
                               progress=None)
    from_folder = extract_images(folder, CHEAP, ["pool"], weights="random", cache=tmp_path / "c",
                                 options=options, progress=None)
    ours, theirs = _by_image(from_tars, tars), _by_image(from_folder, folder)
    assert ours.keys() == theirs.keys()
    for image, row in ours.items():
        assert np.array_equal(row, theirs[image])
    assert np.array_equal(np.sort(from_tars.labels), np.sort(from_folder.labels))


@pytest.mark.parametrize("label", ["cls", "txt"])
def test_labels_come_from_cls_or_txt_members(tmp_path, demo_dir, label) -> None:
    folder = find_images(demo_dir)
    tars = find_images(to_tars(demo_dir, tmp_path / "tars", label=label))
    if label == "cls":
        assert tars.classes == tuple(str(i) for i in range(len(folder.classes)))
    else:
        assert tars.classes == folder.classes
    by_bytes = {folder.read_bytes(i): folder.labels[i] for i in range(len(folder))}
    assert all(by_bytes[tars.read_bytes(i)] == tars.labels[i] for i in range(len(tars)))


def test_a_missing_shard_of_the_pattern_is_one_clear_line(tmp_path, demo_dir) -> None:
    pattern = to_tars(demo_dir, tmp_path / "tars")
    os.remove(tmp_path / "tars" / "part-000001.tar")
    result = run_cli("extract", pattern, *CHEAP_RANDOM, cwd=tmp_path)
    assert_clean_error(result, "tar shard not found", "part-000001.tar")


def test_a_corrupt_member_is_skipped_and_a_damaged_tar_keeps_what_precedes_the_damage(tmp_path) -> None:
    write_images(tmp_path / "imgs", {"a": 6, "b": 6})
    pattern = to_tars(tmp_path / "imgs", tmp_path / "tars", shards=2)
    with tarfile.open(tmp_path / "tars" / "part-000000.tar", "a") as tar:
        _add(tar, "a/broken.jpg", b"\xff\xd8\xff not really a jpeg")
    whole = (tmp_path / "tars" / "part-000001.tar").read_bytes()
    (tmp_path / "tars" / "part-000001.tar").write_bytes(whole[: len(whole) // 2])  # cut mid-member
    images = find_images(pattern)
    assert "part-000001.tar" in images.skipped and "damaged tar" in images.skipped["part-000001.tar"]
    assert 6 <= len(images) < 13  # the first tar whole (with the broken member), part of the second
    store = extract_images(images, CHEAP, ["pool"], weights="random", cache=tmp_path / "c",
                           options=OPTIONS,
                           progress=None)
    skipped = FeatureStore(store.folder).manifest.skipped
    assert set(skipped) == {"part-000000.tar/a/broken.jpg", "part-000001.tar"}  # the member and the tar
    assert len(store.read_layer("pool").index) == len(images) - 1


def test_a_rewritten_tar_is_extracted_again_and_the_rest_is_kept(tmp_path) -> None:
    write_images(tmp_path / "imgs", {"a": 8, "b": 8})
    pattern = to_tars(tmp_path / "imgs", tmp_path / "tars", shards=2)
    first = extract_images(find_images(pattern), CHEAP, ["pool"], weights="random",
                           cache=tmp_path / "c",
                           options=OPTIONS, progress=None)
    time.sleep(0.01)
    write_images(tmp_path / "imgs", {"a": 8, "b": 8}, seed=5)  # other pixels, same names
    to_tars(tmp_path / "imgs", tmp_path / "other", shards=2)
    (tmp_path / "tars" / "part-000001.tar").write_bytes((tmp_path / "other" / "part-000001.tar").read_bytes())
    again = extract_images(find_images(pattern), CHEAP, ["pool"], weights="random",
                           cache=tmp_path / "c",
                           options=OPTIONS, progress=None)
    assert again.folder == first.folder
    redone = again.manifest.runs[-1].images
    assert 0 < redone < again.n_images  # only the shards holding the rewritten tar's images
    fresh = extract_images(find_images(pattern), CHEAP, ["pool"], weights="random",
                           cache=tmp_path / "fresh",
                           seed=0, options=OPTIONS, progress=None)
    assert np.array_equal(again.read_layer("pool").features, fresh.read_layer("pool").features)


def test_tars_from_the_command_line_then_svm(tmp_path, small) -> None:
    pattern = to_tars(small, tmp_path / "tars")
    result = run_cli("extract", pattern, *CHEAP_RANDOM,
                     "--layer", "pool", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_cli("svm", "--dataset", "part", "--train-per-class", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| pool |" in result.stdout


def test_a_pattern_with_no_two_classes_is_refused(tmp_path) -> None:
    write_images(tmp_path / "imgs", {"a": 3})
    (tmp_path / "imgs" / "b").mkdir()
    with tarfile.open(tmp_path / "one-000000.tar", "w") as tar:
        tar.add(tmp_path / "imgs" / "a", arcname="a")
    with pytest.raises(FeatxError, match="comparing layers needs at least two"):
        find_images(str(tmp_path / "one-{000000..000000}.tar"))
