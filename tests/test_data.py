"""Finding images and splits; loading every kind of image as RGB."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from featx.data.images import ImageSet, load_image
from featx.data.scan import find_images
from featx.data.splits import read_split_file, seeded_split
from featx.errors import FeatxError

from conftest import write_images


def test_class_folders_are_found_case_insensitively_without_hidden_files(tmp_path) -> None:
    root = write_images(tmp_path / "set", {"cat": 2, "dog": 3})
    (root / "cat" / "img_000.jpg").rename(root / "cat" / "UPPER.JPG")
    (root / "cat" / ".hidden.jpg").write_bytes(b"x")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".git").mkdir()
    images = find_images(root)
    assert images.classes == ("cat", "dog")
    assert sorted(images.paths) == ["cat/UPPER.JPG", "cat/img_001.jpg", "dog/img_000.jpg",
                                    "dog/img_001.jpg", "dog/img_002.jpg"]
    assert images.labels.tolist() == [0, 0, 1, 1, 1]
    assert images.fixed_split is None


def test_train_and_test_folders_give_a_fixed_split(tmp_path) -> None:
    write_images(tmp_path / "set" / "train", {"a": 3, "b": 2})
    write_images(tmp_path / "set" / "test", {"a": 1, "b": 2})
    images = find_images(tmp_path / "set")
    assert images.classes == ("a", "b")
    assert images.fixed_split.count("train") == 5 and images.fixed_split.count("test") == 3
    assert all(p.startswith(s + "/") for p, s in zip(images.paths, images.fixed_split))


def test_the_scan_records_size_and_times_and_an_in_place_swap_shows_in_the_change_time(tmp_path) -> None:
    root = write_images(tmp_path / "set", {"a": 2, "b": 2})
    images = find_images(root)
    first = root / images.paths[0]
    stat = first.stat()
    assert images.stats[0].tolist() == (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    assert np.array_equal(images.stats, ImageSet(root, images.paths, images.labels,
                                                 images.classes).file_stats())
    time.sleep(0.05)  # past the file system's clock tick
    data = bytearray(first.read_bytes())
    data[-3] ^= 0xFF  # same size, other content, same modification time
    first.write_bytes(bytes(data))
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = find_images(root).stats[0]
    assert (again["size"], again["mtime_ns"]) == (stat.st_size,
                                                  stat.st_mtime_ns)  # size and time cannot see it
    assert again["ctime_ns"] != stat.st_ctime_ns  # the change time, which no one can set, does


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent", "dataset folder not found"),
    (lambda p: p, "no class folders"),
    (lambda p: (p / "a").mkdir() or (p / "b").mkdir() or write_images(p, {"a": 1}), "class folder b"),
])
def test_bad_dataset_folders_are_clear_errors(tmp_path, make, message) -> None:
    with pytest.raises(FeatxError, match=message):
        find_images(make(tmp_path))


def test_seeded_split_is_stratified_reproducible_and_checked() -> None:
    labels = np.repeat([0, 1, 2], [10, 12, 8])
    a = seeded_split(labels, ("x", "y", "z"), 5, seed=1)
    b = seeded_split(labels, ("x", "y", "z"), 5, seed=1)
    c = seeded_split(labels, ("x", "y", "z"), 5, seed=2)
    assert np.array_equal(a.train, b.train) and not np.array_equal(a.train, c.train)
    assert np.bincount(labels[a.train]).tolist() == [5, 5, 5]
    assert sorted(np.concatenate([a.train, a.test]).tolist()) == list(range(30))
    with pytest.raises(FeatxError, match=r"train_per_class 8 leaves no test image in class z \(8 images\)"):
        seeded_split(labels, ("x", "y", "z"), 8, seed=0)


def test_split_file_is_read_and_checked(tmp_path) -> None:
    good = tmp_path / "split.csv"
    good.write_text("path,label,split\na/1.jpg,a,train\na/2.jpg,a,test\n")
    split = read_split_file(good)
    assert split.paths == ("a/1.jpg", "a/2.jpg") and split.codes.tolist() == [1, 2]
    assert split.codes_for(["a/2.jpg", "b/9.jpg", "a/1.jpg"]).tolist() == [2, 0, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,split\na/1.jpg,a,validation\n")
    with pytest.raises(FeatxError, match="train or test"):
        read_split_file(bad)
    with pytest.raises(FeatxError, match="split file not found"):
        read_split_file(tmp_path / "absent.csv")


def _save(tmp_path, name: str, image: Image.Image, **kwargs) -> Image.Image:
    image.save(tmp_path / name, **kwargs)
    return load_image(tmp_path / name)[0]


def test_every_image_mode_becomes_8_bit_rgb(tmp_path) -> None:
    gray = _save(tmp_path, "gray.png", Image.new("L", (8, 6), 100))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    palette = Image.new("P", (8, 6), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert _save(tmp_path, "palette.png", palette).getpixel((0, 0)) == (10, 20, 30)
    rgba = _save(tmp_path, "rgba.png", Image.new("RGBA", (8, 6), (200, 0, 0, 0)))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    cmyk = _save(tmp_path, "cmyk.jpg", Image.new("CMYK", (8, 6), (0, 255, 255, 0)))
    red, green, blue = cmyk.getpixel((0, 0))
    assert cmyk.mode == "RGB" and red > 200 and green < 60 and blue < 60
    deep = Image.fromarray(np.full((6, 8), 65535 // 2, dtype=np.uint16))
    sixteen = _save(tmp_path, "deep.png", deep)
    assert sixteen.mode == "RGB" and abs(sixteen.getpixel((0, 0))[0] - 128) <= 1


def test_exif_orientation_is_applied(tmp_path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rotated.jpg")[0].size == (20, 40)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_unreadable_files_raise(tmp_path, content: bytes) -> None:
    (tmp_path / "bad.jpg").write_bytes(content)
    with pytest.raises((OSError, ValueError)):
        load_image(tmp_path / "bad.jpg")
