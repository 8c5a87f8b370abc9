"""The HDF5 shard cache: round trip, atomic shards, resume after interruption, stale caches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featx.cache.dtypes import check_stored, to_stored
from featx.cache.key import CacheKey
from featx.cache.shards import ShardWriter
from featx.cache.store import FeatureStore
from featx.data.scan import find_images
from featx.errors import FeatxError
from featx.extract.forward import HostFeatures, LayerExtractor, batch_that_fits, batches_of, extract_batches
from featx.extract.run import extract_to_cache, logged_progress
from featx.models import load_model

from conftest import CHEAP, write_images

LAYERS = ["features.8_pool", "pool", "logits"]
POOL = 576  # the pool layer's width


@pytest.fixture(scope="module")
def images40(tmp_path_factory) -> Path:
    """Three classes, 40 images."""
    return write_images(tmp_path_factory.mktemp("images40") / "data", {"a": 14, "b": 13, "c": 13}, size=48)


def _extractor(seed: int = 0, layers=LAYERS) -> LayerExtractor:
    model = load_model(CHEAP, "random", seed=seed)
    return LayerExtractor(model, model.spec.resolve_layers(layers), "cpu", precision="fp32")


def _open(root, images, extractor: LayerExtractor, dtype: str = "float32", weights=None) -> FeatureStore:
    """The cache of these images for the extractor's weights and precision."""
    weights = weights or extractor.model.weights
    key = CacheKey.of(weights, precision=extractor.precision, dtype=dtype)
    return FeatureStore.open_for(root, images, key=key, weights=weights,
                                 layer_names=[layer.name for layer in extractor.model.spec.layers])


def _cache(root, images, extractor=None, **kwargs) -> FeatureStore:
    extractor = extractor or _extractor()
    store = _open(root, images, extractor)
    extract_to_cache(store, extractor, images, workers=0, **kwargs)
    return store


def test_cache_round_trip_equals_direct_extraction(tmp_path, images40) -> None:
    images = find_images(images40)
    extractor = _extractor()
    store = _cache(tmp_path / "cache", images, extractor, batch_size=8, shard_size=16)
    direct = {name: [] for name in LAYERS}
    for out in extract_batches(extractor, images, batches_of(range(len(images)), 8), workers=0):
        for name in LAYERS:
            direct[name].append(out.features[name])
    for name in LAYERS:
        cached = store.read_layer(name)
        assert cached.index.tolist() == list(range(len(images)))  # the writer lost no row
        assert np.array_equal(cached.features, np.concatenate(direct[name]))
        assert np.array_equal(cached.labels, images.labels)
    assert len(list((store.folder / "pool").glob("shard-*.h5"))) == 3
    with h5py.File(store.shard_path("pool", 1)) as f:
        assert f["paths"][0].decode() == images.paths[16]
        assert f.attrs["layer"] == "pool" and f["features"].shape == (16, POOL)
    manifest = json.loads((store.folder / "manifest.json").read_text())
    for key in ("format", "featx_version", "key", "weights", "dataset_root", "rows", "verify", "layers",
                "runs", "skipped"):
        assert key in manifest, key
    assert manifest["format"] == 4 and manifest["rows"] == len(images) and "paths" not in manifest
    assert {"weights_checksum", "preprocess", "dtype"} <= set(manifest["key"])
    assert manifest["layers"]["pool"]["dim"] == POOL
    assert manifest["runs"][0]["layers"] == LAYERS
    assert store.rows.paths() == list(images.paths) and np.array_equal(store.labels, images.labels)


def _pretrained(layers=("pool",)) -> LayerExtractor:
    model = load_model("efficientnet_lite0", "imagenet")
    return LayerExtractor(model, model.spec.resolve_layers(list(layers)), "cpu", precision="fp32")


def test_float16_cache_is_kept_apart_and_close(tmp_path, tiny_dataset) -> None:
    images = find_images(tiny_dataset)
    extractor = _pretrained()
    full = _cache(tmp_path / "cache", images, extractor)
    half = _open(tmp_path / "cache", images, extractor, dtype="float16")
    extract_to_cache(half, extractor, images, workers=0)
    assert half.folder != full.folder and half.folder.name.endswith("-float16")
    with h5py.File(half.shard_path("pool", 0)) as f:
        assert f["features"].dtype == np.float16
    a, b = full.read_layer("pool").features, half.read_layer("pool").features
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(a).max())


class Interrupt(Exception):
    pass


def test_resume_after_an_exception_mid_shard_gives_identical_features(tmp_path, images40) -> None:
    images = find_images(images40)
    reference = _cache(tmp_path / "whole", images, batch_size=4, shard_size=8)

    calls = []

    def stop_mid_shard(n: int, total: int) -> None:
        calls.append(n)
        if len(calls) == 5:  # 20 images: shards 0 and 1 complete, shard 2 half done
            raise Interrupt

    extractor = _extractor()
    store = _open(tmp_path / "resumed", images, extractor)
    with pytest.raises(Interrupt):
        extract_to_cache(store, extractor, images, batch_size=4, shard_size=8, workers=0,
                         on_batch=stop_mid_shard)
    assert sorted(p.name for p in (store.folder / "pool").glob("shard-*")) == [
        "shard-00000.h5", "shard-00001.h5"]
    assert store.missing_shards("pool") == [2, 3, 4]
    with pytest.raises(FeatxError, match="incomplete"):
        store.read_layer("pool")

    summary = extract_to_cache(store, extractor, images, batch_size=4, shard_size=8, workers=0)
    assert summary["images"] == len(images) - 16  # resumed from the first missing shard
    for name in LAYERS:
        assert np.array_equal(store.read_layer(name).features, reference.read_layer(name).features)


@pytest.mark.parametrize("scale, message", [(1e5, "beyond the float16 range"),
                                            (1e-7, "too small for float16")])
def test_float16_refuses_features_it_would_misrepresent(tmp_path, tiny_dataset, scale, message) -> None:
    extractor = _extractor(layers=["pool"])
    store = _open(tmp_path / "cache", find_images(tiny_dataset), extractor, dtype="float16")
    store.plan_layers(extractor.layers, batch_size=1, shard_size=1)
    features = np.random.default_rng(0).uniform(0.5, 2.0, (1, POOL)).astype(np.float32)
    store.write_shard("pool", 0, np.array([0]), features=features, skipped={})  # ordinary values are stored
    with pytest.raises(FeatxError, match=message):
        store.write_shard("pool", 1, np.array([1]), features=features * scale, skipped={})
    assert not store.shard_path("pool", 1).exists() and not list(store.folder.rglob("*.tmp"))


def test_the_extractor_hands_features_over_in_the_cache_dtype() -> None:
    model = load_model("efficientnet_lite0", "imagenet")  # random weights' pool is below float16
    layers = model.spec.resolve_layers(["pool", "logits"])
    images = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    full = LayerExtractor(model, layers, "cpu", precision="fp32", dtype="float32")(images)
    half = LayerExtractor(model, layers, "cpu", precision="fp32", dtype="float16")(images)
    for name in ("pool", "logits"):
        assert full[name].dtype == torch.float32 and half[name].dtype == torch.float16
        assert torch.equal(half[name], full[name].half())  # rounded once, where computed
    assert LayerExtractor(model, layers, "cpu", precision="fp32", dtype="auto").dtype == "float32"  # on a CPU


@pytest.mark.parametrize("scale, message", [(1e5, "beyond the float16 range"),
                                            (1e-7, "too small for float16")])
def test_float16_check_runs_where_features_are_converted(scale, message) -> None:
    values = torch.from_numpy(np.random.default_rng(0).uniform(0.5, 2.0, (3, 64)).astype(np.float32))
    _, code = to_stored(values, "float16")
    check_stored("pool", int(code))  # ordinary values pass
    half, code = to_stored(values * scale, "float16")
    pending = HostFeatures({"pool": half}, {"pool": code})
    with pytest.raises(FeatxError, match=message):
        pending.wait()


def test_the_gpu_batch_is_the_largest_power_of_two_in_half_the_free_memory() -> None:
    gib = 2**30
    assert batch_that_fits(per_image=100 * 2**20, free=40 * gib) == 128  # 128 x 100 MiB <= 20 GiB
    assert batch_that_fits(per_image=10 * 2**20, free=80 * gib) == 256  # capped
    assert batch_that_fits(per_image=3 * gib, free=4 * gib) == 1  # never below one image


def test_a_cache_made_with_other_weights_or_images_is_refused(tmp_path, tiny_dataset) -> None:
    images = find_images(tiny_dataset)
    extractor = _extractor(seed=0)
    first = _cache(tmp_path / "cache", images, extractor)
    other_seed = _open(tmp_path / "cache", images, _extractor(seed=1))
    assert other_seed.folder != first.folder  # other weights live side by side
    changed = extractor.model.weights.with_checksum("0" * 16)  # same name, other file content
    with pytest.raises(FeatxError, match=r"another weights checksum \(\w+ there, 0+ now\)"):
        _open(tmp_path / "cache", images, extractor, weights=changed)
    model = load_model(CHEAP, "random", seed=0)
    bf16 = LayerExtractor(model, model.spec.resolve_layers(LAYERS), "cpu", precision="bf16")
    with pytest.raises(FeatxError, match=r"another precision \(fp32 there, bf16 now\)"):
        _open(tmp_path / "cache", images, bf16)
    # a changed image list is not a refusal: sync_images redoes only what it touches


def test_a_cache_of_an_older_featx_is_named_not_misread(tmp_path, tiny_dataset) -> None:
    images = find_images(tiny_dataset)
    store = _cache(tmp_path / "cache", images)
    manifest = json.loads(store.manifest_path.read_text())
    del manifest["format"]
    store.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FeatxError, match="made by an older featx"):
        _open(tmp_path / "cache", images, _extractor())


def test_unreadable_images_are_skipped_counted_and_listed(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"disks": 6, "stripes": 6, "gradient": 6})
    (data / "disks" / "empty.jpg").write_bytes(b"")
    (data / "stripes" / "text.png").write_text("hello")
    good = (data / "gradient" / "img_000.jpg").read_bytes()
    (data / "gradient" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    images = find_images(data)
    store = _cache(tmp_path / "cache", images, batch_size=4, shard_size=8)
    assert set(store.manifest.skipped) == {"disks/empty.jpg", "stripes/text.png", "gradient/truncated.jpg"}
    data = store.read_layer("pool")
    assert len(data.index) == len(images) - 3
    skipped_rows = {images.paths.index(p) for p in store.manifest.skipped}
    assert not skipped_rows & set(data.index.tolist())


def test_shard_writer_writes_every_submitted_shard(tmp_path, tiny_dataset) -> None:
    images = find_images(tiny_dataset)
    extractor = _extractor(layers=["pool"])
    store = _open(tmp_path / "cache", images, extractor)
    store.plan_layers(extractor.layers, batch_size=1, shard_size=1)
    writer = ShardWriter(store.write_shard, depth=1)
    for k in range(len(images)):
        writer.submit(layer="pool", shard=k, index=np.array([k]), features=np.full((1, POOL), k, np.float32),
                      skipped={})
    writer.close()
    data = store.read_layer("pool")
    assert data.index.tolist() == list(range(len(images)))
    assert np.array_equal(data.features[:, 0], np.arange(len(images), dtype=np.float32))


def test_bf16_computes_in_bf16_and_stays_close_to_fp32() -> None:
    model = load_model("efficientnet_lite0", "imagenet")
    layers = model.spec.resolve_layers(["pool"])
    images = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    fp32 = LayerExtractor(model, layers, "cpu", precision="fp32")(images)["pool"]
    extractor = LayerExtractor(model, layers, "cpu", precision="bf16")
    assert extractor.forward(images)["pool"].dtype == torch.bfloat16  # the pass ran in bf16
    bf16 = extractor(images)["pool"]
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # handed on as float32
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16).min()
    assert cosine > 0.99


def test_progress_in_a_log_is_a_line_every_interval_and_one_at_the_end(caplog) -> None:
    caplog.set_level(logging.INFO, logger="featx")
    with logged_progress("demo", every=3600) as advance:
        for _ in range(4):
            advance(8, 32)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("demo: 32/32 images, ") and "0 s left" in lines[0]
    caplog.clear()
    with logged_progress("demo", every=0) as advance:
        advance(8, 32), advance(8, 32)
    assert [record.getMessage().split(",")[0] for record in caplog.records] == ["demo: 8/32 images",
                                                                             "demo: 16/32 images"]
