"""Cached layers written to the files other tools read: NumPy (.npy, .npz), Parquet, MATLAB (.mat,
v5 or v7.3) and CSV. One row per image that has features, in dataset order, with its path (the
file system's bytes, unchanged), its label and, when one is known, its split; the features exact,
in the cache's dtype where the format has it. A layer of any size is streamed shard by shard
within the memory budget (MATLAB v5 alone is written from memory, and refused past the budget).

A stage of its own beside featx.study, not part of featx.report: it reads the cache and decides
the split exactly as the probes do (`study.split_rows`, `LayerStream` for a combination `a+b`),
and writes files that featx itself never reads back. docs/export.md says what each format holds.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featx import __version__
from featx.cache.store import FeatureStore
from featx.data.images import shown
from featx.data.splits import TEST, TRAIN, read_split_file
from featx.errors import FeatxError, OptionError
from featx.options import (
    DEFAULT_MEMORY,
    MAX_PER_CLASS,
    MAX_SEED,
    Choice,
    check_count,
    describe_bytes,
    parse_memory,
    writable_file,
)

if TYPE_CHECKING:
    from featx.extract.run import Progress
    from featx.probes.stream import LayerStream

log = logging.getLogger(__name__)

BLOCK_BYTES = 32 << 20  # rows in flight at a time, counted in float32
EXPANSION = 8  # a block in flight costs at most this many times its float32 size (read, converted, encoded)
CSV_EXPANSION = 32  # as text, a value takes up to 24 characters
CSV_MAX_VALUES = 10_000_000  # about 200 MB of text: past it CSV is the wrong format
MAT5_MAX_BYTES = 2 << 30  # MATLAB v5 holds at most 2 GB in one variable
SPLIT_NAMES = np.array(["", "train", "test"])  # by split code: 0 (in neither part), TRAIN, TEST


class ExportFormat(Choice):
    """The files `featx export` writes; `mat` is MATLAB v5, or v7.3 where v5 cannot hold the layer."""

    NPY = "npy"
    NPZ = "npz"
    PARQUET = "parquet"
    MAT = "mat"
    MAT5 = "mat5"
    MAT73 = "mat73"
    CSV = "csv"


SUFFIXES = {".npy": ExportFormat.NPY, ".npz": ExportFormat.NPZ, ".parquet": ExportFormat.PARQUET,
            ".mat": ExportFormat.MAT, ".csv": ExportFormat.CSV}
TITLES = {ExportFormat.NPY: "NumPy .npy", ExportFormat.NPZ: "NumPy .npz", ExportFormat.PARQUET: "Parquet",
          ExportFormat.MAT5: "MATLAB v5", ExportFormat.MAT73: "MATLAB v7.3 (HDF5)", ExportFormat.CSV: "CSV"}


@dataclass(frozen=True)
class ExportOptions:
    """How to export: the format (None: from the output's suffix), the memory budget, and the split
    the `split` column holds: a split file, else the dataset's own train/ and test/ folders, else a
    seeded split when `train_per_class` or `seed` is given (as `featx svm` draws it), else none."""

    format: ExportFormat | str | None = None
    memory: str | int = DEFAULT_MEMORY
    split_file: str | None = None
    train_per_class: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.format is not None:
            object.__setattr__(self, "format", ExportFormat.parse(self.format, "format"))
        object.__setattr__(self, "memory", parse_memory(self.memory))
        check_count("train_per_class", self.train_per_class, MAX_PER_CLASS, optional=True)
        check_count("seed", self.seed, MAX_SEED, least=0, optional=True)
        if self.split_file:
            read_split_file(self.split_file)  # exists, is a CSV of path,label,split: checked now

    @property
    def seeded(self) -> bool:
        return self.train_per_class is not None or self.seed is not None


@dataclass(frozen=True)
class Exported:
    """What was written for one layer: its files (the features first), the format (`mat` resolved
    to v5 or v7.3), rows and values a row, the features' type as written, the images of the cache
    without features in this layer (unreadable or removed), how the split was decided ("" when
    there is none), how many blocks were streamed and at most how many rows each, and what was
    converted or chosen, in words."""

    layer: str
    format: ExportFormat
    files: tuple[Path, ...]
    rows: int
    dim: int
    dtype: str
    without_features: int
    split: str
    blocks: int
    block_rows: int
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for people."""
        more = f" (and {', '.join(f.name for f in self.files[1:])})" if len(self.files) > 1 else ""
        parts = [f"{self.layer}: wrote {self.rows} rows x {self.dim} {self.dtype} to {self.files[0]}{more}, "
                 f"{TITLES[self.format]}",
                 f"split: {self.split}" if self.split else "no split column (give --split FILE, or "
                 "--train-per-class N --seed S for a seeded split)"]
        if self.without_features:
            plural = "" if self.without_features == 1 else "s"
            parts.append(f"{self.without_features} cached image{plural} without features in {self.layer} "
                         "(unreadable or removed): not written")
        return "; ".join(parts + list(self.notes))


def output_format(out: str | Path, format: ExportFormat | str | None = None) -> ExportFormat:
    """The format `out` is written in: `format`, else its suffix; an unknown suffix, or a format
    its suffix contradicts, is one OptionError naming the supported ones."""
    suffix = Path(out).suffix.lower()
    named = SUFFIXES.get(suffix)
    if format is None:
        if named is None:
            raise OptionError("out", f"{out} has no suffix featx writes: end it in "
                              f"{', '.join(SUFFIXES)}, or give --format ({ExportFormat.names()})")
        return named
    chosen = ExportFormat.parse(format, "format")
    family = ExportFormat.MAT if chosen in (ExportFormat.MAT5, ExportFormat.MAT73) else chosen
    if named is not None and named != family:
        raise OptionError("format", f"is {chosen} and --out {out} ends in {suffix}: give one, or make "
                          "them agree")
    return chosen


@dataclass
class _Plan:
    """One layer's export, decided and checked before anything is written."""

    name: str
    format: ExportFormat
    target: Path
    files: tuple[Path, ...]
    index: np.ndarray  # the dataset rows exported, in order
    dim: int
    source: np.dtype  # the features as read
    written: np.dtype  # the features as written
    block_rows: int
    path_width: int  # bytes of the longest path
    codes: np.ndarray | None  # split code per exported row; None: no split known
    split: str
    stream: LayerStream | None = None  # a combination's rows, as the probes read them
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Block:
    start: int  # position of its first row among the exported rows
    paths: list[bytes]
    labels: np.ndarray  # int32
    codes: np.ndarray | None
    features: np.ndarray


def export_layers(store: FeatureStore, layers: Sequence[str] | None, out: str | Path,
                  options: ExportOptions | None = None, *, progress: Progress | None = None,
                  ) -> list[Exported]:
    """Write each of `layers` (a layer or a combination `a+b`; None: the cache's one complete
    layer) to `out`, or to OUT-LAYER.SUFFIX each when there are several. Everything is checked
    before the first byte is written: the format, the places, the layers, the dataset, the split,
    the size limits of CSV and MATLAB v5, the budget. Each file is written under a temporary
    name and renamed when whole."""
    from featx.study import check_dataset, layer_parts

    options = options or ExportOptions()
    fmt = output_format(out, options.format)
    writable_file(out, "out")
    _check_installed(fmt)
    names = list(dict.fromkeys(layers or [])) or _default_layer(store)
    targets = _targets(Path(out), names)
    store.check_layers(layer_parts(names))
    check_dataset(store)
    plans = [_plan(store, name, target, fmt, options) for name, target in targets.items()]
    for plan in plans:
        for path in plan.files:
            writable_file(path, "out")
    return [_write(store, plan, progress) for plan in plans]


def _check_installed(fmt: ExportFormat) -> None:
    """Parquet needs pyarrow and MATLAB v5 scipy (the `export` extra): said before any work."""
    needs = {ExportFormat.PARQUET: ("pyarrow", "Parquet"), ExportFormat.MAT: ("scipy", "MATLAB v5"),
             ExportFormat.MAT5: ("scipy", "MATLAB v5")}.get(fmt)
    if needs is None:
        return
    try:
        __import__(needs[0])
    except ImportError:
        raise FeatxError(f"{needs[1]} files need {needs[0]}, which is not installed: pip install "
                         "'featx[export]'") from None


def _default_layer(store: FeatureStore) -> list[str]:
    complete = store.complete_layers()
    if len(complete) == 1:
        return complete
    if not complete:
        raise FeatxError(f"no complete layer in the cache {store.label}; run featx extract first")
    raise FeatxError(f"the cache {store.label} holds {len(complete)} layers ({', '.join(complete)}): choose "
                     "with --layer (repeat it for several, one file each)")


def _targets(out: Path, names: list[str]) -> dict[str, Path]:
    """`out` for one layer; OUT-LAYER.SUFFIX for each of several (a name's odd characters as _)."""
    if len(names) == 1:
        return {names[0]: out}
    stem, suffix = (out.name[:-len(out.suffix)], out.suffix) if out.suffix else (out.name, "")
    targets = {name: out.with_name(f"{stem}-{_safe(name)}{suffix}") for name in names}
    if len(set(targets.values())) < len(targets):
        raise OptionError("layer", f"names {', '.join(names)} that give the same file name; export them "
                          "one at a time")
    return targets


def _safe(name: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "._+-") else "_" for c in name)


def _files(target: Path, fmt: ExportFormat, split: bool) -> tuple[Path, ...]:
    """The files one layer's export makes: one, or for .npy the features and one .npy per column."""
    if fmt != ExportFormat.NPY:
        return (target,)
    stem = target.name[:-4] if target.name.lower().endswith(".npy") else target.name
    parts = ["paths", "labels", "classes"] + (["split"] if split else [])
    return (target, *(target.with_name(f"{stem}.{part}.npy") for part in parts))


def _plan(store: FeatureStore, name: str, target: Path, fmt: ExportFormat, options: ExportOptions) -> _Plan:
    from featx.study import ProbingOptions, split_rows

    parts = name.split("+")
    stream = None
    if len(parts) > 1:
        from featx.probes.stream import LayerStream

        stream = LayerStream(store, name, "none", device="cpu")
        index, source = stream.index, np.dtype(np.float32)
    else:
        index, source = store.layer_index(name), np.dtype(store.key.dtype)
    if not len(index):
        raise FeatxError(f"layer {name} in {store.label} holds no image's features: nothing to export")
    dim = sum(store.manifest.layers[part].dim for part in parts)
    notes = []
    if stream is not None:
        notes.append(f"{name} is its parts each scaled to unit length (l2), then side by side, in float32 "
                     "(as the probes see it)")
    codes, split = None, ""
    if options.split_file or store.manifest.fixed_split or options.seeded:
        probing = ProbingOptions(split_file=options.split_file, train_per_class=options.train_per_class,
                                 seed=options.seed or 0, memory=options.memory, device="cpu")
        (chosen,) = split_rows(store, index, probing)
        codes = np.zeros(len(index), dtype=np.uint8)
        codes[chosen.train], codes[chosen.test] = TRAIN, TEST
        split = chosen.description
    ends = store.rows.column("path.end")
    starts = np.concatenate([[0], ends[:-1]])
    path_width = max(1, int((ends[index] - starts[index]).max()))
    values = len(index) * dim
    if fmt == ExportFormat.CSV and values > CSV_MAX_VALUES:
        raise FeatxError(f"layer {name} is {len(index)} rows x {dim} values ({values:,}): too many for CSV "
                         f"(at most {CSV_MAX_VALUES:,}); write .npy, .npz, .parquet or .mat instead")
    if fmt in (ExportFormat.MAT, ExportFormat.MAT5):
        fmt = _mat_variant(name, fmt, features=values * 4, paths=len(index) * path_width,
                           budget=options.memory, notes=notes)
    written = source
    if fmt == ExportFormat.MAT5 and source == np.float16:
        written = np.dtype(np.float32)
        notes.append("float16 written as float32 (MATLAB single; exact): MATLAB v5 has no half precision")
    if fmt == ExportFormat.MAT73 and source == np.float16:
        notes.append("float16 kept (HDF5 half precision), marked single for HDF5 to convert exactly as "
                     "MATLAB reads it")
    if fmt == ExportFormat.CSV:
        notes.append(f"each value as the exact decimal of its {source} value")
    expansion = CSV_EXPANSION if fmt == ExportFormat.CSV else EXPANSION
    rows = min(BLOCK_BYTES, options.memory // expansion) // (4 * dim)
    if rows < 1:
        raise OptionError("memory", f"{_bytes(options.memory)} is too small for one row of layer {name} "
                          f"({dim} values): {describe_bytes(expansion * 4 * dim)} or more would work")
    return _Plan(name, fmt, target, _files(target, fmt, codes is not None), index, dim, source, written,
                 int(rows), path_width, codes, split, stream, notes)


def _mat_variant(name: str, fmt: ExportFormat, *, features: int, paths: int, budget: int,
                 notes: list[str]) -> ExportFormat:
    """MATLAB v5 where it can hold the layer (under 2 GB a variable, and in memory within the
    budget: scipy writes it from one array, copied once); else v7.3, said, or refused when v5 was
    asked for by name."""
    need = 2 * (features + paths)
    if features > MAT5_MAX_BYTES:
        why = f"{describe_bytes(features)} of features, over MATLAB v5's 2 GB a variable"
    elif need > budget:
        why = f"{_bytes(need)} in memory to write it as MATLAB v5, over --memory {_bytes(budget)}"
    else:
        return ExportFormat.MAT5
    if fmt == ExportFormat.MAT5:
        raise FeatxError(f"layer {name} takes {why}; --format mat73 writes it block by block")
    notes.append(f"MATLAB v7.3 chosen: the layer takes {why}")
    return ExportFormat.MAT73


def _bytes(n: int) -> str:
    """A size in words: exact below a mebibyte (a budget given in bytes through the API)."""
    return describe_bytes(n) if n >= 1 << 20 else f"{n} bytes"


# --- reading ------------------------------------------------------------------------------------
def _blocks(store: FeatureStore, plan: _Plan) -> Iterator[_Block]:
    """The exported rows in order, at most `plan.block_rows` at a time, with their paths (bytes),
    labels and split codes."""
    if plan.stream is None:
        source = store.iter_blocks(plan.name, plan.block_rows, stored=True)
    else:
        source = ((plan.index[here], block.numpy())
                  for here, block in plan.stream.blocks(plan.block_rows, scaled=False))
    done = 0
    for rows, features in source:
        if not len(rows):
            continue
        codes = plan.codes[done:done + len(rows)] if plan.codes is not None else None
        yield _Block(done, [os.fsencode(p) for p in store.rows.paths(rows)],
                     np.asarray(store.labels[rows], dtype=np.int32), codes,
                     np.ascontiguousarray(features, dtype=plan.written))
        done += len(rows)
    if done != len(plan.index):
        raise RuntimeError(f"layer {plan.name}: {done} rows read where {len(plan.index)} belong")


# --- writing ------------------------------------------------------------------------------------
def _write(store: FeatureStore, plan: _Plan, progress: Progress | None) -> Exported:
    started = time.perf_counter()
    classes = [shown(name) for name in store.classes]
    writer = {ExportFormat.NPY: _write_npy, ExportFormat.NPZ: _write_npz,
              ExportFormat.PARQUET: _write_parquet, ExportFormat.MAT5: _write_mat5,
              ExportFormat.MAT73: _write_mat73, ExportFormat.CSV: _write_csv}[plan.format]
    counted = 0
    with (progress(f"export {plan.name}") if progress else nullcontext(None)) as advance:
        def counting(blocks: Iterator[_Block]) -> Iterator[_Block]:
            nonlocal counted
            for block in blocks:
                counted += 1
                yield block
                if advance:
                    advance(len(block.paths), len(plan.index))

        with _replacing(plan.files) as temps:
            writer(store, plan, counting(_blocks(store, plan)), temps, classes)
    log.debug(f"exported {plan.name} in {time.perf_counter() - started:.1f} s")
    return Exported(plan.name, plan.format, plan.files, len(plan.index), plan.dim, str(plan.written),
                    store.n_images - len(plan.index), plan.split, counted, plan.block_rows, tuple(plan.notes))


@contextmanager
def _replacing(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Temporary names beside `paths`, renamed onto them when the block ends without an error, and
    removed either way: an interrupted export leaves no file that looks whole."""
    temps = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in paths]
    try:
        yield temps
        for temp, path in zip(temps, paths):
            os.replace(temp, path)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def _npy_header(f, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": shape})


def _write_npy(store: FeatureStore, plan: _Plan, blocks: Iterator[_Block], temps: list[Path],
               classes: list[str]) -> None:
    """features.npy (N x dim) and paths (bytes, |S: NUL-padded, which no path contains), labels
    (int32), classes (str) and split (str) beside it, each header first and rows appended."""
    n = len(plan.index)
    columns = [(plan.written, (n, plan.dim)), (np.dtype(f"S{plan.path_width}"), (n,)),
               (np.dtype("<i4"), (n,))]
    if plan.codes is not None:
        columns.append((SPLIT_NAMES.dtype, (n,)))
    streamed = [temps[0], *temps[1:3]] + ([temps[4]] if plan.codes is not None else [])
    files = [open(path, "wb") for path in streamed]  # closed below, together
    try:
        for f, (dtype, shape) in zip(files, columns):
            _npy_header(f, dtype, shape)
        for block in blocks:
            values = [block.features, np.array(block.paths, dtype=columns[1][0]), block.labels]
            if block.codes is not None:
                values.append(SPLIT_NAMES[block.codes])
            for f, value, (dtype, _) in zip(files, values, columns):
                f.write(np.ascontiguousarray(value, dtype=dtype).data)
    finally:
        for f in files:
            f.close()
    with open(temps[3], "wb") as f:  # a file, not a name: np.save would add .npy to it
        np.save(f, np.array(classes, dtype=str))


def _write_npz(store: FeatureStore, plan: _Plan, blocks: Iterator[_Block], temps: list[Path],
               classes: list[str]) -> None:
    """The .npy files of `_write_npy`, written to a folder beside the output, then stored (not
    compressed) in one zip as features, paths, labels, classes and split."""
    with tempfile.TemporaryDirectory(dir=temps[0].parent, prefix=".featx-export-") as folder:
        parts = [Path(folder) / f"{name}.npy" for name in ("features", "paths", "labels", "classes", "split")]
        _write_npy(store, plan, blocks, parts, classes)
        with zipfile.ZipFile(temps[0], "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for part in parts:
                if part.exists():
                    archive.write(part, part.name)


def _metadata(store: FeatureStore, plan: _Plan, classes: list[str]) -> dict:
    return {"layer": plan.name, "cache": store.label, "model": store.model, "weights": store.key.weights,
            "dtype": str(plan.written), "classes": classes, "split": plan.split, "notes": plan.notes,
            "featx_version": __version__}


def _write_parquet(store: FeatureStore, plan: _Plan, blocks: Iterator[_Block], temps: list[Path],
                   classes: list[str]) -> None:
    """One row group per block: path (binary), label (class name), label_index (int32), split
    (train, test or null) when known, features (a fixed-size list in the features' type)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [pa.field("path", pa.binary(), nullable=False), pa.field("label", pa.string(), nullable=False),
              pa.field("label_index", pa.int32(), nullable=False)]
    if plan.codes is not None:
        fields.append(pa.field("split", pa.string()))
    fields.append(pa.field("features", pa.list_(pa.from_numpy_dtype(plan.written), plan.dim), nullable=False))
    schema = pa.schema(fields, metadata={"featx": json.dumps(_metadata(store, plan, classes))})
    names = np.array(classes, dtype=object)
    split_names = np.array([None, "train", "test"], dtype=object)
    small = [f.name for f in fields if f.name != "features"]  # min/max of feature values: costly, unused
    with pq.ParquetWriter(temps[0], schema, write_statistics=small) as writer:
        for block in blocks:
            columns = [pa.array(block.paths, pa.binary()), pa.array(names[block.labels], pa.string()),
                       pa.array(block.labels, pa.int32())]
            if block.codes is not None:
                columns.append(pa.array(split_names[block.codes], pa.string()))
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(block.features.reshape(-1)), plan.dim))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema), row_group_size=len(block.paths))


def _padded(paths: list[bytes], width: int) -> np.ndarray:
    """Paths as rows of bytes (uint8), NUL-padded to `width`."""
    return np.array(paths, dtype=f"S{width}").view(np.uint8).reshape(len(paths), width)


def _write_mat5(store: FeatureStore, plan: _Plan, blocks: Iterator[_Block], temps: list[Path],
                classes: list[str]) -> None:
    """One MATLAB v5 file from arrays in memory (scipy writes no other way): features (N x dim),
    labels (int32, N x 1), paths (uint8 N x width, NUL-padded), classes (char matrix), layer, and
    split (uint8 N x 1: 1 train, 2 test, 0 neither) when known."""
    from scipy.io import savemat

    n = len(plan.index)
    features = np.empty((n, plan.dim), dtype=plan.written)
    paths = np.zeros((n, plan.path_width), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int32)
    for block in blocks:
        stop = block.start + len(block.paths)
        features[block.start:stop] = block.features
        paths[block.start:stop] = _padded(block.paths, plan.path_width)
        labels[block.start:stop] = block.labels
    variables = {"features": features, "labels": labels, "paths": paths,
                 "classes": np.array(classes, dtype=str), "layer": plan.name}
    if plan.codes is not None:
        variables["split"] = plan.codes
    with open(temps[0], "wb") as f:
        savemat(f, variables, format="5", oned_as="column")


MAT73_HEADER_TEXT = "MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {} HDF5 schema 1.00 ."
MATLAB_CLASSES = {"float16": "single", "float32": "single", "int32": "int32", "uint8": "uint8"}


def mat73_header(created: time.struct_time | None = None) -> bytes:
    """The 128 bytes MATLAB reads at the start of a v7.3 file (an HDF5 file with a 512-byte user
    block): 116 bytes of text, 8 of subsystem offset, version 0x0200, the endian mark `IM`."""
    text = MAT73_HEADER_TEXT.format(time.strftime("%a %b %d %H:%M:%S %Y", created or time.gmtime()))
    return text.encode("ascii").ljust(116, b" ") + bytes(8) + b"\x00\x02IM"


def _mat73_variable(f, name: str, shape: tuple[int, int], dtype: np.dtype, *, chunk_rows: int = 0):
    """A MATLAB rows x cols variable: an HDF5 dataset cols x rows (MATLAB is column-major), with
    its MATLAB_class; chunked by rows when `chunk_rows`."""
    rows, cols = shape
    chunks = (cols, min(rows, chunk_rows)) if chunk_rows else None
    dataset = f.create_dataset(name, shape=(cols, rows), dtype=dtype, chunks=chunks)
    dataset.attrs.create("MATLAB_class", np.bytes_(MATLAB_CLASSES[np.dtype(dtype).name]))
    return dataset


def _mat73_chars(f, name: str, texts: list[str]) -> None:
    """A MATLAB char matrix (one text a row, space-padded): UTF-16 code units, column-major."""
    units = [np.frombuffer(text.encode("utf-16-le"), dtype="<u2") for text in texts]
    width = max(1, *(len(u) for u in units))
    matrix = np.full((len(texts), width), ord(" "), dtype="<u2")
    for row, u in enumerate(units):
        matrix[row, :len(u)] = u
    dataset = f.create_dataset(name, data=matrix.T)
    dataset.attrs.create("MATLAB_class", np.bytes_("char"))
    dataset.attrs.create("MATLAB_int_decode", np.int32(2))


def _write_mat73(store: FeatureStore, plan: _Plan, blocks: Iterator[_Block], temps: list[Path],
                 classes: list[str]) -> None:
    """MATLAB v7.3: the variables of `_write_mat5` as HDF5 datasets in MATLAB's layout, written
    block by block; the features in their own type (float16 stays float16)."""
    import h5py

    n, item = len(plan.index), plan.written.itemsize
    chunk = max(1, (1 << 20) // (plan.dim * item))  # about 1 MiB a chunk, whole rows
    cache = max(16 << 20, 4 * chunk * plan.dim * item)  # partly written chunks stay until whole
    with h5py.File(temps[0], "w", userblock_size=512, libver="earliest", rdcc_nbytes=cache) as f:
        features = _mat73_variable(f, "features", (n, plan.dim), plan.written, chunk_rows=chunk)
        paths = _mat73_variable(f, "paths", (n, plan.path_width), np.dtype(np.uint8),
                                chunk_rows=max(1, (1 << 20) // plan.path_width))
        labels = _mat73_variable(f, "labels", (n, 1), np.dtype(np.int32), chunk_rows=1 << 16)
        split = None
        if plan.codes is not None:
            split = _mat73_variable(f, "split", (n, 1), np.dtype(np.uint8), chunk_rows=1 << 16)
            split[0, :] = plan.codes
        for block in blocks:
            stop = block.start + len(block.paths)
            features[:, block.start:stop] = block.features.T
            paths[:, block.start:stop] = _padded(block.paths, plan.path_width).T
            labels[0, block.start:stop] = block.labels
        _mat73_chars(f, "classes", classes)
        _mat73_chars(f, "layer", [plan.name])
    with open(temps[0], "r+b") as f:
        f.write(mat73_header())


def _write_csv(store: FeatureStore, plan: _Plan, blocks: Iterator[_Block], temps: list[Path],
               classes: list[str]) -> None:
    """UTF-8 text: path and label as reports show them (a byte that is not UTF-8 as \\xNN, which
    --split reads back), label_index, split when known, then f0, f1, ... each the exact decimal of
    the stored value (read as a double and rounded to the stored type, it is that value again).
    Text cells are quoted as the csv module quotes them; the numbers need no quoting, and are
    joined directly (twice as fast as through the csv writer)."""
    names = [_csv_cell(name) for name in classes]
    with open(temps[0], "w", newline="", encoding="utf-8") as f:
        f.write(",".join(["path", "label", "label_index"] + (["split"] if plan.codes is not None else [])
                         + [f"f{k}" for k in range(plan.dim)]) + "\r\n")
        for block in blocks:
            for k, (path, label, values) in enumerate(zip(block.paths, block.labels.tolist(),
                                                          block.features.astype(np.float64).tolist())):
                shown_path = _csv_cell(path.decode("utf-8", "backslashreplace"))
                split = f",{SPLIT_NAMES[block.codes[k]]}" if block.codes is not None else ""
                f.write(f"{shown_path},{names[label]},{label}{split}," + ",".join(map(repr, values)) + "\r\n")


def _csv_cell(text: str) -> str:
    """A text cell as csv.writer writes it: quoted when it holds a comma, a quote or a line break."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text
