"""Device decoding (`--decode device`): the same crops and features as PIL, the same files
skipped for the same reasons, PIL for every file the device decoder cannot take as it is, and
the decoder in the cache's identity. On a CPU the device decoder is libjpeg-turbo through the
same code that runs nvJPEG on a GPU."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from featx.cache.store import FeatureStore
from featx.data.decode import device_batches, device_can_decode, pil_batches
from featx.data.scan import find_images
from featx.errors import OptionError
from featx.extract.forward import LayerExtractor, batches_of, extract_batches
from featx.extract.run import ExtractOptions, extract_images
from featx.models import load_model
from featx.options import resolve_decode

from conftest import run_cli


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)  # smooth, like a photo


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92, **kwargs)
    return out.getvalue()


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """A class of files of every kind the device decoder meets: plain, grey, wide and tall
    JPEGs, and files it must hand to PIL: PNG, CMYK, EXIF-rotated, truncated, not an image."""
    root = tmp_path_factory.mktemp("odd")
    folder = root / "a"
    folder.mkdir()
    rotated = Image.Exif()
    rotated[0x0112] = 6
    files = {
        "plain.jpg": _jpeg(_noise((300, 200), 1)),
        "same_size.jpg": _jpeg(_noise((300, 200), 2)),
        "grey.jpg": _jpeg(_noise((180, 240), 3).convert("L")),
        "strip.jpg": _jpeg(_noise((1200, 100), 4)),
        "cmyk.jpg": _jpeg(_noise((200, 200), 5).convert("CMYK")),
        "rotated.jpg": _jpeg(_noise((320, 200), 6), exif=rotated),
        "truncated.jpg": _jpeg(_noise((300, 300), 7))[:900],
        "text.jpg": b"not an image at all",
    }
    png = io.BytesIO()
    _noise((260, 220), 8).save(png, "PNG")
    files["picture.png"] = png.getvalue()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (root / "b").mkdir()
    (root / "b" / "other.jpg").write_bytes(_jpeg(_noise((240, 260), 9)))
    return root


def test_device_decoder_takes_plain_jpegs_and_hands_the_rest_to_pil(odd_files) -> None:
    taken = {path.name: device_can_decode(path.read_bytes()) for path in (odd_files / "a").iterdir()}
    assert taken == {"plain.jpg": True, "same_size.jpg": True, "grey.jpg": True, "strip.jpg": True,
                     "truncated.jpg": True,  # its header is fine: the decoder refuses it, then PIL
                     "cmyk.jpg": False, "rotated.jpg": False, "text.jpg": False, "picture.png": False}


def test_device_crops_match_pil_and_failures_are_the_same(odd_files) -> None:
    images = find_images(odd_files)
    preprocess = load_model("vgg16", "random").preprocess
    batches = batches_of(range(len(images)), 4)
    pil = list(pil_batches(images, preprocess, batches, workers=0))
    device = list(device_batches(images, preprocess, batches, device=torch.device("cpu"), workers=2))
    for (i_pil, x_pil, e_pil), (i_dev, x_dev, e_dev) in zip(pil, device):
        assert i_pil.tolist() == i_dev.tolist()
        assert e_pil == e_dev  # the same files unreadable, in PIL's words
        for k, index in enumerate(i_pil):
            name = images.paths[index]
            diff = (x_pil[k].float() - x_dev[k].float()).abs()
            if name.endswith(("cmyk.jpg", "rotated.jpg", "picture.png", "truncated.jpg", "text.jpg")):
                assert torch.equal(x_pil[k], x_dev[k]), name  # PIL decoded it in both
            else:
                assert diff.mean() < 2.0 and diff.max() < 64, name  # two JPEG decoders, one resize
    errors = {images.paths[i]: e.error for i_, _, es in device for i, e in zip(i_, es) if e.error}
    assert set(errors) == {"a/truncated.jpg", "a/text.jpg"}


@pytest.mark.parametrize(("model", "weights", "layers"), [
    ("resnet18", "random", ["layer3_pool", "pool"]),
    ("efficientnet_lite0", "imagenet", ["stage7_pool", "pool"]),
])
def test_device_and_pil_decoding_give_the_same_features(demo_dir, model, weights, layers) -> None:
    images = find_images(demo_dir)
    loaded = load_model(model, weights)
    batches = batches_of(range(0, len(images), 6), 8)  # 16 images, four of each class
    features = {}
    for decode in ("pil", "device"):
        extractor = LayerExtractor(loaded, loaded.spec.resolve_layers(layers), "cpu", precision="fp32",
                                   decode=decode)
        out = list(extract_batches(extractor, images, batches, workers=0))
        features[decode] = {name: np.concatenate([b.features[name] for b in out]) for name in layers}
    for name in layers:
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(features["pil"][name]),
                                                       torch.from_numpy(features["device"][name]))
        assert cosine.min() >= 0.99, (name, cosine.min())


def test_auto_decoding_is_device_on_a_gpu_and_pil_on_a_cpu() -> None:
    assert resolve_decode("auto", torch.device("cpu")) == "pil"
    assert resolve_decode("auto", torch.device("cuda")) == "device"
    assert resolve_decode("device", torch.device("cpu")) == "device"
    with pytest.raises(OptionError, match="decode must be one of"):
        resolve_decode("nvjpeg", torch.device("cpu"))


def test_the_decoder_is_part_of_the_cache_identity(tmp_path, tiny_dataset) -> None:
    images = find_images(tiny_dataset)
    stores = {decode: extract_images(images, "efficientnet_lite0", ["pool"], weights="random", cache=tmp_path,
                                     options=ExtractOptions(device="cpu", workers=0, decode=decode),
                                     progress=None)
              for decode in ("pil", "device")}
    assert stores["pil"].folder != stores["device"].folder
    assert stores["device"].folder.name.endswith("-device-decode")
    assert {s.key.decode for s in stores.values()} == {"pil", "device"}
    assert FeatureStore(stores["device"].folder).manifest.runs[-1].settings["decode"] == "device"
    pil = stores["pil"].read_layer("pool").features
    dev = stores["device"].read_layer("pool").features
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(pil), torch.from_numpy(dev)).min() > 0.99


def test_a_cache_made_before_decoders_were_recorded_is_a_pil_cache(tmp_path, tiny_dataset) -> None:
    images = find_images(tiny_dataset)
    options = ExtractOptions(device="cpu", workers=0, decode="pil")
    store = extract_images(images, "efficientnet_lite0", ["pool"], weights="random", cache=tmp_path,
                           options=options,
                           progress=None)
    manifest = json.loads(store.manifest_path.read_text())
    del manifest["key"]["decode"]  # as an older featx wrote it
    store.manifest_path.write_text(json.dumps(manifest))
    again = extract_images(images, "efficientnet_lite0", ["pool"], weights="random", cache=tmp_path,
                           options=options,
                           progress=None)
    assert again.folder == store.folder and len(again.manifest.runs) == 1  # reused, nothing redone


def test_extract_with_device_decoding_from_the_command_line(tmp_path, tiny_dataset) -> None:
    result = run_cli("extract", str(tiny_dataset), "--model", "efficientnet_lite0", "--weights", "random",
                     "--layer", "pool", "--decode", "device", "--device", "cpu", "--cache", "c", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "device decoding" in result.stderr
    assert len(list((tmp_path / "c").rglob("*-device-decode/pool/shard-*.h5"))) == 1
