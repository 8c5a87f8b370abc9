"""Images inside tar shards in WebDataset's layout, read in place: each tar's member index, read
once per tar and modification time, gives every member's offset, so extraction streams through a
tar without unpacking it."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from featx.data.images import IMAGE_EXTENSIONS, STATS, ImageSet
from featx.errors import FeatxError


@dataclass(frozen=True)
class TarIndex:
    """A tar's regular members -> (data offset, size), in tar order, from its headers; `damage`
    says why they stop early (a tar is read as far as it is sound), empty when it is whole."""

    members: dict[str, tuple[int, int]]
    damage: str = ""


@lru_cache(maxsize=256)
def _tar_index(tar: str, mtime_ns: int) -> TarIndex:
    members: dict[str, tuple[int, int]] = {}
    try:
        length = os.path.getsize(tar)
        with tarfile.open(tar, "r:") as opened:
            for info in opened:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > length:
                    raise tarfile.ReadError(f"it ends inside {info.name}")
                members[info.name] = (info.offset_data, info.size)
            if opened.offset + 2 * tarfile.BLOCKSIZE > length:  # a whole tar ends in two zero blocks
                raise tarfile.ReadError("it ends without the end-of-archive blocks (cut short?)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        return TarIndex(members, str(exc) or type(exc).__name__)
    return TarIndex(members)


def tar_index(tar: Path) -> TarIndex:
    """The tar's index, read once per tar and modification time."""
    return _tar_index(str(tar), tar.stat().st_mtime_ns)


def dataset_name(pattern: Path) -> str:
    """A pattern's stem without its range: train-{000000..000127}.tar -> train."""
    return re.sub(r"\{[^}]*\}", "", pattern.name.removesuffix(".tar")).strip("-_.") or "tars"


def read_member(folder: Path, path: str) -> bytes:
    """The bytes of `<tar name>/<member name>` in `folder`, read at the member's offset."""
    shard, member = path.split("/", 1)
    tar = folder / shard
    members = tar_index(tar).members
    if member not in members:
        raise OSError(f"{member} is no longer in {tar}")
    offset, size = members[member]
    with tar.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def member_stats(folder: Path, paths: Sequence[str]) -> np.ndarray:
    """STATS per member: its size, and its tar's modification and change time (a rewritten tar is
    extracted again, member by member); -1 for a member or tar that is gone."""
    stats = np.full(len(paths), -1, dtype=STATS)
    tars: dict[str, os.stat_result | None] = {}  # each tar looked at once
    for k, rel in enumerate(paths):
        shard, member = rel.split("/", 1)
        if shard not in tars:
            try:
                tars[shard] = (folder / shard).stat()
            except OSError:
                tars[shard] = None
        info = tars[shard]
        if info is None:
            continue
        size = _tar_index(str(folder / shard), info.st_mtime_ns).members.get(member, (0, -1))[1]
        stats[k] = (size, info.st_mtime_ns, info.st_ctime_ns)
    return stats


def find_in_tars(pattern: str) -> ImageSet:
    """The images in tar shards in WebDataset's layout: `pattern` names the shards with a brace
    range (`train-{000000..000127}.tar`). A sample is the members that share a key (the path up
    to the first dot of its name); its image is its image member, its label the text of its
    `.cls` member (a class number), else of its `.txt` member (a class name), else the folder of
    its key. Images are in shard order, then member order: the order extraction streams them."""
    from webdataset.shardlists import expand_urls
    from webdataset.tariterators import base_plus_ext

    shards = [Path(p).expanduser() for p in expand_urls(pattern)]
    if not shards:
        raise FeatxError(f"no tar shards in {pattern}")
    folder = shards[0].parent.resolve()
    for shard in shards:
        if not shard.is_file():
            raise FeatxError(f"tar shard not found: {shard} (of {pattern})")
        if shard.parent.resolve() != folder:
            raise FeatxError(f"the tar shards of {pattern} must sit in one folder")
    paths: list[str] = []
    names: list[str] = []
    skipped: dict[str, str] = {}
    for shard in shards:
        index = tar_index(shard)
        if index.damage:
            skipped[shard.name] = f"damaged tar, read up to the damage: {index.damage}"
        samples: dict[str, dict[str, str]] = {}
        with shard.open("rb") as tar:
            for name, (offset, size) in index.members.items():
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                ext = ext.lower()
                sample = samples.setdefault(key, {})
                if ext in ("cls", "txt"):
                    tar.seek(offset)
                    sample[ext] = tar.read(size).decode("utf-8", "replace").strip()
                elif "." + ext in IMAGE_EXTENSIONS and "image" not in sample:
                    sample["image"] = name  # the first (not seg.png beside a jpg)
        for key, sample in samples.items():
            if "image" not in sample:
                continue
            label = sample.get("cls") or sample.get("txt") or key.rpartition("/")[0]
            if not label:
                skipped[f"{shard.name}/{sample['image']}"] = "no label (.cls, .txt or a folder in its key)"
                continue
            paths.append(f"{shard.name}/{sample['image']}")
            names.append(label)
    numbered = all(n.lstrip("-").isdigit() for n in names)
    classes = sorted(set(names), key=int if numbered else str)
    if len(classes) < 2:
        raise FeatxError(f"{pattern} has {len(classes)} class{'es' if not classes else ''}; "
                         "comparing layers needs at least two")
    index = {name: label for label, name in enumerate(classes)}
    return ImageSet(folder / Path(pattern).name, tuple(paths),
                    np.asarray([index[n] for n in names], dtype=np.int64), tuple(classes), skipped=skipped,
                    stats=member_stats(folder, paths))
