"""`featx export`: every format read back equals the cache bit for bit (features in the cache's
dtype, or converted exactly where the format has no float16), with the paths' bytes, the labels
and the split the probes would use; streamed within the budget; bad input is one line."""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io

from featx.cache.key import CacheKey
from featx.cache.store import FeatureStore
from featx.data.scan import find_images
from featx.data.splits import unshown
from featx.export import ExportFormat, ExportOptions, export_layers
from featx.models import Layer, Preprocess, Weights
from featx.study import ProbingOptions, split_rows

from conftest import SHARED_DATA, array_store, assert_clean_error, run_cli, write_images

ODD = b"train/b/caf\xe9 \xff.jpg"  # a name that is not UTF-8 (Latin-1 bytes)
QUOTED = 'train/a/comma, "quote".jpg'  # a name CSV must quote
FORMATS = {"npy": ".npy", "npz": ".npz", "parquet": ".parquet", "mat5": ".mat", "mat73": ".mat",
           "csv": ".csv"}
KEEPS_FLOAT16 = {"npy", "npz", "parquet", "mat73"}


def image_cache(root: Path, dtype: str) -> tuple[FeatureStore, dict[str, np.ndarray]]:
    """A cache of real files laid out as train/ and test/, one with a name that is not UTF-8, one
    without features (unreadable) and one removed since, holding random features for layers `a`
    and `b` in `dtype`; and those features, by dataset row."""
    data = root / "data"
    write_images(data / "train", {"a": 4, "b": 3}, size=8)
    write_images(data / "test", {"a": 3, "b": 3}, size=8, seed=1)
    shutil.copy(data / "train/b/img_000.jpg", os.fsdecode(os.fsencode(data) + b"/" + ODD))
    shutil.copy(data / "train/b/img_000.jpg", data / QUOTED)
    images = find_images(data)
    weights = Weights(model="made", tag="here", source="file", preprocess=Preprocess(), location=str(data),
                      categories=None, checksum="made")
    store = FeatureStore.open_for(root / "featx-cache", images, weights=weights, layer_names=["a", "b"],
                                  key=CacheKey.of(weights, precision="fp32", dtype=dtype))
    store.plan_layers([Layer("a", "a", (6,)), Layer("b", "b", (4,))], batch_size=1, shard_size=4)
    rng = np.random.default_rng(0)
    features = {name: rng.standard_normal((len(images), dim)).astype(dtype)
                for name, dim in (("a", 6), ("b", 4))}
    unreadable = images.paths.index("test/a/img_001.jpg")
    for name, values in features.items():
        for k, (start, stop) in enumerate(store.shard_ranges(name)):
            rows = np.array([i for i in range(start, stop) if i != unreadable], dtype=np.int64)
            store.write_shard(name, k, rows, features=values[rows], skipped={})
    (data / "train/a/img_003.jpg").unlink()  # removed after extraction: marked, never read
    store.sync_images(find_images(data))
    return FeatureStore(store.folder), features


def read_back(path: Path, fmt: str) -> dict:
    """features, paths (bytes), labels, classes and split codes (None: no split) as written."""
    if fmt == "npy":
        stem = path.with_suffix("")
        split = Path(f"{stem}.split.npy")
        return {"features": np.load(path), "paths": list(np.load(f"{stem}.paths.npy")),
                "labels": np.load(f"{stem}.labels.npy"), "classes": list(np.load(f"{stem}.classes.npy")),
                "split": codes(np.load(split)) if split.exists() else None}
    if fmt == "npz":
        data = np.load(path)  # no pickle: every array is plain
        return {"features": data["features"], "paths": list(data["paths"]), "labels": data["labels"],
                "classes": list(data["classes"]), "split": codes(data["split"]) if "split" in data else None}
    if fmt == "parquet":
        table = pq.read_table(path)
        dim = table.schema.field("features").type.list_size
        classes = __import__("json").loads(table.schema.metadata[b"featx"])["classes"]
        labels = table["label_index"].to_numpy()
        assert table["label"].to_pylist() == [classes[k] for k in labels]
        return {"features": table["features"].combine_chunks().flatten().to_numpy().reshape(-1, dim),
                "paths": table["path"].to_pylist(), "labels": labels, "classes": classes,
                "split": codes([s or "" for s in table["split"].to_pylist()]) if "split" in table.column_names
                else None}
    if fmt == "mat5":
        data = scipy.io.loadmat(path)
        assert scipy.io.matlab.matfile_version(path) == (1, 0)
        return {"features": data["features"], "paths": [bytes(row).rstrip(b"\0") for row in data["paths"]],
                "labels": data["labels"].ravel(), "classes": [c.rstrip() for c in data["classes"]],
                "split": data["split"].ravel() if "split" in data else None}
    if fmt == "mat73":
        assert scipy.io.matlab.matfile_version(path) == (2, 0)  # the header MATLAB reads
        with h5py.File(path, "r") as f:
            assert f.userblock_size == 512
            assert {k: f[k].attrs["MATLAB_class"] for k in f} == {
                "features": b"single", "paths": b"uint8", "labels": b"int32", "classes": b"char",
                "layer": b"char", **({"split": b"uint8"} if "split" in f else {})}
            chars = f["classes"][...].T  # MATLAB is column-major: HDF5 holds the transpose
            return {"features": f["features"][...].T,
                    "paths": [bytes(row).rstrip(b"\0") for row in f["paths"][...].T],
                    "labels": f["labels"][0],
                    "classes": [row.tobytes().decode("utf-16-le").rstrip() for row in chars],
                    "split": f["split"][0] if "split" in f else None}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    head, body = rows[0], rows[1:]
    first = head.index("f0")
    return {"features": np.array([r[first:] for r in body], dtype=np.float64),
            "paths": [os.fsencode(unshown(r[0])) for r in body],
            "labels": np.array([int(r[2]) for r in body]),
            "classes": None, "split": codes([r[3] for r in body]) if "split" in head else None}


def codes(names) -> np.ndarray:
    return np.array([{"": 0, "train": 1, "test": 2}[str(n)] for n in names], dtype=np.uint8)


def split_codes(store: FeatureStore, index: np.ndarray, probing: ProbingOptions) -> np.ndarray:
    (split,) = split_rows(store, index, probing)
    expected = np.zeros(len(index), dtype=np.uint8)
    expected[split.train], expected[split.test] = 1, 2
    return expected


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_reads_back_as_the_cache(tmp_path, fmt, dtype) -> None:
    store, features = image_cache(tmp_path, dtype)
    out = tmp_path / "out" / f"a{FORMATS[fmt]}"
    result = run_cli("export", "--layer", "a", "--out", str(out), "--format", fmt, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    index = store.layer_index("a")
    assert len(index) == store.n_images - 2  # the unreadable and the removed image are absent
    assert f"wrote {len(index)} rows x 6" in result.stdout
    assert "2 cached images without features in a" in result.stdout
    got = read_back(out, fmt)
    expected = features["a"][index]
    if fmt == "csv":  # exact decimals: read as doubles, rounded to the cache's type
        assert np.array_equal(got["features"].astype(dtype), expected)
    elif fmt in KEEPS_FLOAT16 or dtype == "float32":
        assert got["features"].dtype == np.dtype(dtype) and np.array_equal(got["features"], expected)
    else:  # MATLAB v5 has no float16: float32, exactly, and said
        assert got["features"].dtype == np.float32
        assert np.array_equal(got["features"], expected.astype(np.float32))
        assert "float16 written as float32" in result.stdout
    assert got["paths"] == [os.fsencode(p) for p in store.rows.paths(index)]
    assert ODD in got["paths"] and QUOTED.encode() in got["paths"]
    assert np.array_equal(got["labels"], store.labels[index])
    assert got["classes"] in (None, list(store.classes))
    assert np.array_equal(got["split"], split_codes(store, index, ProbingOptions()))  # train/ and test/
    assert "split: the dataset's own train/ and test/ folders" in result.stdout
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.fixture
def arrays(tmp_path) -> tuple[FeatureStore, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    layers = {"pool": rng.standard_normal((36, 7)).astype(np.float32),
              "stage2_pool": rng.standard_normal((36, 5)).astype(np.float32)}
    store = array_store(tmp_path / "featx-cache", layers, np.repeat(np.arange(3), 12), shard_size=8,
                        missing=(5,))
    return store, layers


def test_split_column_is_the_split_the_probes_would_use(tmp_path, arrays) -> None:
    store, _ = arrays
    index = store.layer_index("pool")
    (tmp_path / "split.csv").write_text("path,label,split\n" + "".join(
        f"{p},x,{'train' if k % 3 else 'test'}\n" for k, p in enumerate(store.rows.paths(index[:20]))))
    cases = {"seeded": (ExportOptions(train_per_class=4, seed=3), ProbingOptions(train_per_class=4, seed=3)),
             "file": (ExportOptions(split_file=str(tmp_path / "split.csv")),
                      ProbingOptions(split_file=str(tmp_path / "split.csv")))}
    for name, (options, probing) in cases.items():
        (exported,) = export_layers(store, ["pool"], tmp_path / f"{name}.parquet", options)
        got = read_back(tmp_path / f"{name}.parquet", "parquet")["split"]
        assert np.array_equal(got, split_codes(store, index, probing)), name
        said = "4 training images per class, seed 3" if name == "seeded" else "split file"
        assert exported.split.startswith(said)
    assert (got == 0).sum() == len(index) - 20  # rows the split file does not list: in neither part
    export_layers(store, ["pool"], tmp_path / "none.parquet")
    assert "split" not in pq.read_table(tmp_path / "none.parquet").column_names  # no split known: no column


def test_a_layer_larger_than_the_budget_is_written_in_blocks(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    layer = rng.standard_normal((640, 256)).astype(np.float32)  # 640 KiB
    store = array_store(tmp_path / "cache", {"wide": layer}, np.repeat(np.arange(4), 160), shard_size=128)
    read = []
    original = FeatureStore.iter_blocks

    def counted(self, *args, **kwargs):
        for index, block in original(self, *args, **kwargs):
            read.append(len(index))
            yield index, block

    monkeypatch.setattr(FeatureStore, "iter_blocks", counted)
    budget = 8 * 4 * 256 * 20  # 20 rows a block
    for fmt in ("npy", "parquet", "mat73", "csv"):
        read.clear()
        if fmt == "npy":  # numpy's buffers are traced: far from the whole layer at once
            tracemalloc.start()
        (exported,) = export_layers(store, ["wide"], tmp_path / f"wide{FORMATS[fmt]}",
                                    ExportOptions(memory=budget * (4 if fmt == "csv" else 1), format=fmt))
        if fmt == "npy":
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < layer.nbytes / 4, peak
        assert max(read) <= 20 and sum(read) == 640 and exported.blocks == len(read) >= 32, fmt
        assert np.array_equal(read_back(tmp_path / f"wide{FORMATS[fmt]}", fmt)["features"].astype(np.float32),
                              layer), fmt
    with pytest.raises(Exception, match="--format mat73 writes it block by block"):
        export_layers(store, ["wide"], tmp_path / "wide.mat", ExportOptions(memory=budget, format="mat5"))
    (exported,) = export_layers(store, ["wide"], tmp_path / "auto.mat", ExportOptions(memory=budget))
    assert exported.format == ExportFormat.MAT73 and "MATLAB v7.3 chosen" in exported.describe()
    (exported,) = export_layers(store, ["wide"], tmp_path / "auto.mat")  # the default 2G holds it
    assert exported.format == ExportFormat.MAT5


def test_a_combination_is_its_parts_scaled_and_side_by_side(tmp_path, arrays) -> None:
    store, layers = arrays
    result = run_cli("export", "--layer", "stage2_pool+pool", "--out", "both.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "each scaled to unit length (l2), then side by side, in float32" in result.stdout
    index = store.layer_index("pool")

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    got = read_back(tmp_path / "both.npz", "npz")
    expected = np.hstack([unit(layers["stage2_pool"][index]), unit(layers["pool"][index])])
    assert got["features"].dtype == np.float32 and np.array_equal(got["features"], expected)
    assert got["paths"] == [os.fsencode(p) for p in store.rows.paths(index)]


def test_help_examples_run_as_printed(tmp_path, arrays) -> None:
    from featx.cli.app import export

    store, _ = arrays
    (tmp_path / "split.csv").write_text("path,label,split\n" + "".join(
        f"{p},x,{'train' if k % 2 else 'test'}\n" for k, p in enumerate(store.rows.paths())))
    examples = re.findall(r"`(featx export [^`]+)`", " ".join(export.__doc__.split()))
    assert len(examples) >= 5
    for example in examples:
        result = run_cli(*shlex.split(example)[1:], cwd=tmp_path)
        assert result.returncode == 0, (example, result.stderr)
    written = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert {"pool.npy", "pool.paths.npy", "pool.parquet", "pool.mat", "both.npz", "small-pool.csv",
            "small-stage2_pool.csv"} <= written


@pytest.mark.parametrize(("args", "needles"), [
    (["--layer", "pool", "--out", "x.txt"],
     ["--out x.txt has no suffix", ".npy, .npz, .parquet, .mat, .csv"]),
    (["--layer", "pool", "--out", "x.npy", "--format", "xls"], ["--format must be one of npy, npz"]),
    (["--layer", "pool", "--out", "x.csv", "--format", "parquet"], ["--format is parquet and --out x.csv"]),
    (["--layer", "pool", "--out", "afile/x.npy"], ["--out afile: a file is in the way"]),
    (["--layer", "nope", "--out", "x.npy"], ["has no layer 'nope'"]),
    (["--out", "x.npy"], ["holds 2 layers (pool, stage2_pool): choose with --layer"]),
    (["--layer", "pool", "--out", "x.csv"],
     ["too many for CSV", "write .npy, .npz, .parquet or .mat instead"]),
    (["--layer", "pool", "--out", "x.npy", "--memory", "1K"], ["--memory must be at least"]),
    (["--layer", "pool", "--out", "x.npy", "--split", "nofile.csv"], ["split file not found: nofile.csv"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, arrays, monkeypatch, args, needles) -> None:
    monkeypatch.setattr("featx.export.CSV_MAX_VALUES", 100)  # this tiny layer is "too large" for CSV
    (tmp_path / "afile").write_text("")
    before = set(tmp_path.iterdir())
    assert_clean_error(run_cli("export", *args, cwd=tmp_path), *needles)
    assert set(tmp_path.iterdir()) == before


def test_a_damaged_shard_stops_the_export_and_leaves_no_file(tmp_path, arrays) -> None:
    store, _ = arrays
    with h5py.File(store.shard_path("pool", 3), "r+") as f:  # readable, but not what its checksum says:
        f["features"][0, 0] += 1  # found at the end of that shard, after three were written
    result = run_cli("export", "--layer", "pool", "--out", "x.parquet", cwd=tmp_path)
    assert_clean_error(result, "damaged")
    assert not [p for p in tmp_path.iterdir() if "x.parquet" in p.name]


def test_parquet_without_pyarrow_names_the_extra(tmp_path, arrays, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    result = run_cli("export", "--layer", "pool", "--out", "x.parquet", cwd=tmp_path)
    assert_clean_error(result, "Parquet files need pyarrow", "pip install 'featx[export]'")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "15scene").is_dir(),
                    reason=f"the 15-Scene dataset is not at {SHARED_DATA / '15scene'} (FEATX_SHARED_DATA)")
def test_15scene_pool_exports_with_the_protocol_split(tmp_path) -> None:
    from featx.study import extract

    split = SHARED_DATA / "15scene-split.csv"
    store = extract(SHARED_DATA / "15scene", "efficientnet_lite0", ["pool"], cache=tmp_path / "featx-cache",
                    progress=None)
    result = run_cli("export", "--layer", "pool", "--out", "pool.parquet", "--split", str(split),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    layer = store.read_layer("pool")
    got = read_back(tmp_path / "pool.parquet", "parquet")
    assert len(layer.index) == 4485 and np.array_equal(got["features"].astype(np.float32), layer.features)
    assert got["paths"] == [os.fsencode(p) for p in store.rows.paths(layer.index)]
    assert np.bincount(got["split"], minlength=3).tolist() == [0, 1500, 2985]
    protocol = ProbingOptions(split_file=str(split))
    assert np.array_equal(got["split"], split_codes(store, layer.index, protocol))
