"""Hostile and odd inputs: names that are not UTF-8 or carry Markdown, HTML and mathematics, images
too large to decode, degenerate splits, signals at start-up, and a property test over random file
names and split files. Each ends in a correct result or one `featx: error:` line."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featx.cache.store import FeatureStore

from conftest import assert_clean_error, run_cli, write_images

LITE = ["--model", "efficientnet_lite0", "--weights", "random", "--workers", "0"]
FOLDER = "efficientnet_lite0-random-seed0"


def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=85)


def test_names_that_are_not_utf8_are_kept_as_bytes_and_shown_escaped(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 3, "b": 3}, size=32)
    odd = os.fsencode(data / "b") + b"/caf\xe9 \xff.jpg"  # Latin-1 bytes from another system
    _jpeg(Path(os.fsdecode(odd)), 7)
    Path(os.fsdecode(os.fsencode(data / "a") + b"/\xe0 broken.jpg")).write_bytes(b"no image")
    page = tmp_path / "page.html"
    result = run_cli("table", str(data), *LITE, "--layer", "stage2_pool", "--train-per-class", "2", "--C",
                     "1",
                     "--html", str(page), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    store = FeatureStore(tmp_path / "featx-cache" / "data" / FOLDER)
    name = os.fsdecode(b"b/caf\xe9 \xff.jpg")
    assert name in store.rows.paths() and store.n_images == 8  # stored losslessly, read back as it was
    assert (store.folder / "rows" / "path.bytes").read_bytes().count(b"caf\xe9 \xff.jpg") == 1
    assert store.rows.find([name])[0] in store.read_layer("stage2_pool").index  # and has its features
    out = tmp_path / "featx-results" / "data" / FOLDER
    report = json.loads((out / "table.json").read_text())
    assert os.fsdecode(b"a/\xe0 broken.jpg") in report["skipped"]  # the JSON keeps the name itself
    assert "a/\\xe0 broken.jpg" in (out / "table.md").read_text()  # people see it escaped
    assert "a/\\xe0 broken.jpg" in page.read_text()
    again = run_cli("svm", "--train-per-class", "2", "--C", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # and recognised unchanged by the next command
    Path(os.fsdecode(odd)).unlink()
    assert_clean_error(run_cli("svm", "--train-per-class", "2", cwd=tmp_path),
                       "1 removed (b/caf\\xe9 \\xff.jpg)")


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that says it is width x height (a decompression bomb's header) with one tiny row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 7))
                     + chunk(b"IEND", b""))


def test_an_image_over_max_pixels_is_skipped_with_its_size_and_the_limit(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 3, "b": 3}, size=32)
    _png_header(data / "a" / "bomb.png", 40000, 40000)
    result = run_cli("extract", str(data), *LITE, "--layer", "stage2_pool", cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # the scan opens no image: nothing stops it
    assert "skipped unreadable image a/bomb.png (ValueError: 40000x40000 pixels, over the limit of 200 " \
           "megapixels (--max-pixels))" in result.stderr
    store = FeatureStore(tmp_path / "featx-cache" / "data" / FOLDER)
    assert "a/bomb.png" in store.manifest.skipped and len(store.read_layer("stage2_pool").index) == 6


def test_names_with_markup_and_mathematics_are_written_literally(tmp_path) -> None:
    data = tmp_path / "<i>set [y](z)"
    write_images(data, {"<b>bold": 3, "$\\frac{x$": 3, "[link](javascript:x)|pipe": 3}, size=32)
    page = tmp_path / "page.html"
    result = run_cli("table", str(data), *LITE, "--layer", "stage2_pool,stage3_pool", "--train-per-class",
                     "1",
                     "--C", "1", "--html", str(page), cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # the plots draw the names, not mathematics
    out = tmp_path / "featx-results" / data.name / FOLDER
    assert (out / "accuracy.png").is_file() and len(list(out.glob("confusion_*.png"))) == 2
    title = (out / "table.md").read_text().splitlines()[0]
    assert "&lt;i&gt;set \\[y\\](z)" in title and "<i>" not in title  # no live HTML, no link
    html = page.read_text()
    assert "<b>bold" not in html and "&lt;b&gt;bold" in html
    assert '<div class="scroll">' in html and "overflow-x: auto" in html  # wide tables scroll, not overflow


def test_a_signal_while_the_command_starts_is_one_line(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 40, "b": 40}, size=32)
    for sig, code, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
        process = subprocess.Popen([sys.executable, "-m", "featx", "extract", str(data), *LITE],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        time.sleep(1.0)  # loading its libraries and the network
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
        assert process.returncode == code and "Traceback" not in err, err
        assert err.startswith(f"featx: {word}") and len(err.strip().splitlines()) == 1, err


def test_similarity_picks_the_default_variant_and_asks_only_between_given_options(tmp_path) -> None:
    data = write_images(tmp_path / "data", {"a": 4, "b": 4}, size=32)
    for tta in ("none", "flip"):
        assert run_cli("extract", str(data), *LITE, "--layer", "stage2_pool,stage3_pool", "--tta", tta,
                       cwd=tmp_path).returncode == 0
    plain = run_cli("similarity", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr  # --tta left out means none
    assert run_cli("similarity", "--tta", "flip", cwd=tmp_path).returncode == 0
    assert run_cli("svm", "--tta", "flip", "--train-per-class", "2", "--C", "1", cwd=tmp_path).returncode == 0
    assert run_cli("extract", str(data), "--model", "efficientnet_lite0", "--weights", "random", "--seed",
                   "1",
                   "--layer", "stage2_pool", "--workers", "0", cwd=tmp_path).returncode == 0
    asked = run_cli("svm", "--layer", "stage2_pool", "--weights", "random", cwd=tmp_path)
    assert_clean_error(asked, "holds several", "choose one with --weights")  # seed 0 and 1: not a default


def _sums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


NAME = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=12),
    st.binary(min_size=1, max_size=10).filter(lambda b: b"/" not in b and b"\0" not in b).map(os.fsdecode),
    st.sampled_from(["-rf", "--help", "a,b", 'quo"te', "new\nline", " spaced ", "x.jpg"]))


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(names=st.lists(NAME, min_size=4, max_size=7, unique_by=lambda n: os.fsencode(n).lower()),
       sides=st.lists(st.sampled_from(["train", "test", "validation", None]), min_size=7, max_size=7),
       seed=st.integers(0, 3))
def test_random_names_and_split_files_give_a_result_or_one_line(names, sides, seed) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        made = []
        for k, name in enumerate(names):
            folder = data / ("a" if k % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            path = os.fsencode(folder) + b"/" + os.fsencode(name)[:240] + b".jpg"
            try:
                _jpeg(Path(os.fsdecode(path)), seed + k)
            except OSError:
                continue  # a name this file system refuses
            made.append(os.fsdecode(path)[len(str(data)) + 1:])
        result = run_cli("extract", str(data), *LITE, "--layer", "stage2_pool", cwd=root)
        if result.returncode:
            assert_clean_error(result)
            return
        store = FeatureStore(root / "featx-cache" / "data" / FOLDER)
        visible = {p for p in made if not p.split("/", 1)[1].startswith(".")}
        assert set(store.rows.paths()) == visible  # every image accounted for, under its own name
        with open(root / "split.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split"])
            for path, side in zip(sorted(visible), sides):
                if side:
                    writer.writerow([path, path.split("/")[0], side])
        before = _sums(store.folder)
        scored = run_cli("svm", "--split", str(root / "split.csv"), "--C", "1", cwd=root)
        assert scored.returncode in (0, 2), scored.stderr
        if scored.returncode == 2:
            assert_clean_error(scored)
            assert _sums(store.folder) == before  # a refused run changes nothing
        else:
            assert "| stage2_pool |" in scored.stdout
