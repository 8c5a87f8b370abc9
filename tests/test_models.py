"""Networks and weights: equality with torchvision's own computation, eval mode, the hub cache,
local files, random weights and each weight set's own preprocessing."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch.nn import functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from featx.data.preprocess import normalize
from featx.data.scan import find_images
from featx.errors import FeatxError
from featx.extract.forward import LayerExtractor, batches_of, extract_batches
from featx.extract.rewrite import for_inference
from featx.models import get_model, load_model

from conftest import write_images


def _images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _normalised(model, images: torch.Tensor) -> torch.Tensor:
    p = model.preprocess
    return torchvision.transforms.v2.functional.normalize(images.float() / 255, list(p.mean), list(p.std))


def assert_same(ours: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Equal up to float32 rounding, relative to the layer's largest value."""
    assert ours.shape == reference.shape, name
    scale = reference.abs().max().item()
    assert (ours - reference).abs().max().item() <= 1e-5 * scale + 1e-6, name


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "efficientnet_lite0", "mobilenet_v3_small",
                                  "vit_b_32", "swin_t"])
def test_every_layer_has_its_listed_dimension(name: str) -> None:
    model = load_model(name, "random")
    spec = model.spec
    out = LayerExtractor(model, spec.layers, "cpu", precision="fp32")(_images(1, spec.preprocess.crop))
    for layer in spec.layers:
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
    ours = LayerExtractor(model, model.spec.resolve_layers(names), "cpu", precision="fp32")(images)
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
    ours = LayerExtractor(model, model.spec.resolve_layers(["layer3", "layer4", "pool", "logits"]),
                          "cpu", precision="fp32")(images)
    with torch.no_grad():
        tv = create_feature_extractor(reference, {"layer3": "layer3", "layer4": "layer4",
                                                  "avgpool": "pool", "fc": "logits"})(
            _normalised(model, images))
    for name in ("layer3", "layer4", "pool", "logits"):
        assert_same(ours[name], tv[name].flatten(1), name)


def test_activations_run_in_place_only_where_no_requested_layer_is_overwritten() -> None:
    model = load_model("vgg16", "random")
    images = _images(2)
    default = LayerExtractor(model, model.spec.resolve_layers(None), "cpu", precision="fp32")  # pool4..relu7
    both = LayerExtractor(model, model.spec.resolve_layers(["fc6", "relu6"]), "cpu", precision="fp32")
    inplace = {name for name, m in default.graph.named_modules() if getattr(m, "inplace", False)}
    assert "classifier.1" in inplace and "features.1" in inplace  # after fc6, after conv1_1
    assert not both.graph.get_submodule("classifier.1").inplace  # fc6 is requested
    assert not any(getattr(m, "inplace", False) for m in model.module.modules())  # the model's own
    out = both(images)  # built after `default`: each graph has its own activations
    assert (out["fc6"] < 0).any()
    torch.testing.assert_close(out["relu6"], F.relu(out["fc6"]))
    again = default(images)
    assert torch.equal(again["relu6"], both(images)["relu6"])


def _batch_norm_statistics(module: torch.nn.Module, seed: int) -> None:
    """Random running statistics and affine terms, so that folding a batch norm is no identity."""
    g = torch.Generator().manual_seed(seed)
    for norm in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        n = norm.num_features
        norm.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
        norm.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        norm.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
        norm.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0", "mobilenet_v3_small"])
def test_the_graph_rewritten_for_inference_computes_the_traced_layers(name: str) -> None:
    model = load_model(name, "imagenet" if name == "efficientnet_lite0" else "random")
    if name != "efficientnet_lite0":  # Lite's ImageNet weights hold real statistics
        _batch_norm_statistics(model.module, seed=5)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    modules = dict(model.module.named_modules())
    layers = model.spec.layers[1:] if name == "efficientnet_lite0" else model.spec.layers  # not the stem
    traced = LayerExtractor(model, layers, "cpu", precision="fp32", rewrite=False)
    rewritten = LayerExtractor(model, layers, "cpu", precision="fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in rewritten.graph.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in traced.graph.modules())
    pads = [m.padding for m in rewritten.graph.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert all(left != right or top != bottom for left, right, top, bottom in pads)  # stride 2 only
    images = _images(2, model.preprocess.crop)
    ours, reference = rewritten(images), traced(images)
    for layer in layers:
        assert_same(ours[layer.name], reference[layer.name], layer.name)
    after = model.module.state_dict()  # the model itself is as loaded
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert dict(model.module.named_modules()) == modules


class _NormAct(torch.nn.BatchNorm2d):
    """A batch norm with an activation inside (as timm's BatchNormAct2d): not foldable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


def test_rewrites_leave_requested_and_shared_tensors_alone() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            self.conv2, self.bn2 = torch.nn.Conv2d(4, 4, 5, padding=1), torch.nn.BatchNorm2d(4)
            self.pad = torch.nn.ZeroPad2d(1)
            self.relu = torch.nn.ReLU()  # called twice: after bn2, and on a sum
            self.conv3, self.bn3 = torch.nn.Conv2d(4, 4, 1), _NormAct(4)

        def forward(self, x):
            a = self.bn1(self.conv1(x))
            b = self.relu(self.bn2(self.conv2(self.pad(a))))
            return self.bn3(self.conv3(self.relu(a + b)))

    net = Net().eval()
    _batch_norm_statistics(net, seed=6)
    x = torch.randn(2, 3, 12, 12)
    nodes = {"conv1": "conv1", "relu_1": "sum", "bn3": "out"}
    leaves = {"leaf_modules": [_NormAct]}
    expected = create_feature_extractor(net, nodes, tracer_kwargs=leaves)(x)
    graph = for_inference(create_feature_extractor(net, nodes, tracer_kwargs=leaves))
    calls = {n.target: graph.get_submodule(n.target) for n in graph.graph.nodes if n.op == "call_module"}
    assert "bn1" in calls and "bn2" not in calls  # conv1's output is requested: bn1 stays
    assert "bn3" in calls  # a subclass of batch norm may compute more than the norm: it stays
    assert "pad" not in calls and calls["conv2"].padding == (2, 2)  # conv2's padding took the pad's
    assert not net.bn2.training and net.conv2.padding == (1, 1)  # the model's own modules are untouched
    relus = [m for m in calls.values() if isinstance(m, torch.nn.ReLU)]
    assert sorted(m.inplace for m in relus) == [False, True]  # in place after conv2, not on the sum
    assert not net.relu.inplace
    out = graph(x)
    torch.testing.assert_close(out["conv1"], expected["conv1"], rtol=0, atol=0)
    for name in ("sum", "out"):
        torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-6)


def test_two_extractions_of_the_same_images_are_identical() -> None:
    model = load_model("vgg16", "random")
    extractor = LayerExtractor(model, model.spec.resolve_layers(["pool5", "relu6", "relu7"]), "cpu")
    images = _images(2)
    first, second = extractor(images), extractor(images)
    assert not model.module.training
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_forward_pass_stops_at_the_deepest_requested_layer() -> None:
    model = load_model("vgg16", "random")
    extractor = LayerExtractor(model, [model.spec.layer("pool5")], "cpu")
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
    assert loaded.weights.name == "resnet50.IMAGENET1K_V1"
    assert not loaded.weights.random
    for key, value in state.items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    images = _images(1)
    layer = [loaded.spec.layer("pool")]
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
    assert loaded.weights.source == "file" and loaded.weights.tag.startswith("file-")
    assert torch.equal(loaded.module.state_dict()["fc.weight"], state["fc.weight"])


def test_weights_path_refuses_pickled_objects_text_and_wrong_shapes(tmp_path) -> None:
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": object()}, unsafe)
    with pytest.raises(FeatxError, match="cannot read weights file.*Python objects") as error:
        load_model("resnet50", str(unsafe))
    assert "weights_only=False" not in str(error.value)  # no advice to unpickle untrusted code
    text = tmp_path / "notes.pth"
    text.write_text("not a state dict")
    with pytest.raises(FeatxError, match="cannot read weights file"):
        load_model("resnet50", str(text))
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(FeatxError, match="do not fit resnet50"):
        load_model("resnet50", str(wrong))
    with pytest.raises(FeatxError, match="weights file not found"):
        load_model("resnet50", str(tmp_path / "absent.pth"))


def test_random_weights_are_seeded_and_named() -> None:
    a, b, c = (load_model("resnet50", "random", seed=s) for s in (0, 0, 1))
    assert a.weights.random and a.weights.name == "resnet50.random-seed0"
    assert a.weights.checksum == b.weights.checksum != c.weights.checksum


def test_unknown_model_weights_and_layer_names_are_clear_errors() -> None:
    with pytest.raises(FeatxError, match="unknown model 'vgg99'.*featx models"):
        get_model("vgg99")
    with pytest.raises(FeatxError, match="unknown layer 'pool9' for vgg16.*pool5"):
        get_model("vgg16").resolve_layers(["pool5", "pool9"])
    with pytest.raises(FeatxError, match="resnet50 has no weights 'IMAGENET9K'.*IMAGENET1K_V2"):
        get_model("resnet50", "IMAGENET9K")


def test_efficientnet_lite_models_use_their_own_preprocessing() -> None:
    sizes = {name: get_model(name).preprocess for name in
             ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")}
    assert [(p.resize, p.crop) for p in sizes.values()] == [(256, 224), (272, 240), (292, 260)]
    p = sizes["efficientnet_lite0"]
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 1, 3)
    out = normalize(p, pixels.contiguous())
    torch.testing.assert_close(out[0, :, 0, 0], (torch.tensor([0.0, 127, 255]) - 127) / 128)
    assert get_model("vgg16").preprocess.mean == (0.485, 0.456, 0.406)


def test_missing_lite_extra_is_a_clear_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now fails
    with pytest.raises(FeatxError, match=r"pip install 'featx\[lite\]'"):
        load_model("efficientnet_lite1", "imagenet")


# --- weight sets with their own preprocessing, equal to torchvision's own pipeline ------------

def _official_file(torch_home: Path, weights, seed: int) -> dict:
    """Random weights written under the official file name in the torch hub cache."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    builder = getattr(torchvision.models, weights.__class__.__name__.split("_Weights")[0].lower())
    state = builder(weights=None).state_dict()
    torch.save(state, folder / Path(weights.url).name)
    return state


@pytest.mark.parametrize("model, tag, nodes", [
    ("resnet50", "IMAGENET1K_V1", {"layer3": "layer3", "flatten": "pool", "fc": "logits"}),
    ("resnet50", "IMAGENET1K_V2", {"layer4": "layer4", "flatten": "pool"}),
    pytest.param("vgg16", "IMAGENET1K_FEATURES", {"features.23": "pool4", "features.30": "pool5"},
                 marks=pytest.mark.slow),  # a 528 MB file written, hashed and read twice
])
def test_features_equal_torchvision_with_the_weights_own_transforms(tmp_path, monkeypatch, model, tag,
                                                                   nodes) -> None:
    weights = torchvision.models.get_weight(f"{torchvision.models.get_model_weights(model).__name__}.{tag}")
    _official_file(tmp_path / "home", weights, seed=11)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    dataset = write_images(tmp_path / "images", {"a": 2, "b": 1}, size=300)
    images = find_images(dataset)

    loaded = load_model(model, tag)
    assert loaded.weights.name == f"{model}.{tag}"
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (
        weights.transforms().resize_size[0], weights.transforms().crop_size[0])
    layers = loaded.spec.resolve_layers(list(nodes.values()))
    extractor = LayerExtractor(loaded, layers, "cpu", precision="fp32")
    ours = next(extract_batches(extractor, images, batches_of(range(len(images)), 8), workers=0))

    reference = torchvision.models.get_model(model, weights=weights).eval()  # reads the same file
    from PIL import Image

    batch = torch.stack([weights.transforms()(Image.open(images.root / p).convert("RGB"))
                         for p in images.paths])
    with torch.no_grad():
        expected = create_feature_extractor(reference, nodes)(batch)
    for name in nodes.values():
        assert_same(torch.from_numpy(ours.features[name]), expected[name].flatten(1), name)


def test_vgg16_features_weights_use_their_0_to_255_normalisation(tmp_path, monkeypatch) -> None:
    spec = get_model("vgg16", "IMAGENET1K_FEATURES")
    assert max(spec.preprocess.std) < 0.01  # std 1/255: the mean is subtracted on a 0..255 scale
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(spec.preprocess, pixels)
    torch.testing.assert_close(out[0, :, 0, 0], 255 - torch.tensor(spec.preprocess.mean) * 255)


def test_pretrained_weights_are_assigned_to_a_meta_architecture(tmp_path, monkeypatch) -> None:
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    _official_file(tmp_path, weights, seed=5)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    devices = []
    original = torch.nn.init.kaiming_normal_

    def recording(tensor, *args, **kwargs):
        devices.append(tensor.device.type)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", recording)
    loaded = load_model("resnet50", "imagenet")
    assert devices and set(devices) == {"meta"}  # the initialisation ran on no real memory
    parameters = list(loaded.module.parameters()) + list(loaded.module.buffers())
    assert all(t.device.type == "cpu" for t in parameters)


def test_flip_averaging_is_the_mean_of_each_image_and_its_mirror() -> None:
    model = load_model("efficientnet_lite0", "random")
    layers = model.spec.resolve_layers(["stage6_pool", "pool"])
    images = _images(3)
    plain = LayerExtractor(model, layers, "cpu", precision="fp32")
    mirror = plain(images.flip(-1))
    flipped = LayerExtractor(model, layers, "cpu", precision="fp32", tta="flip")(images)
    for name, value in plain(images).items():
        scale = value.abs().max()
        assert (flipped[name] - (value + mirror[name]) / 2).abs().max() <= 1e-4 * scale
        assert (flipped[name] - value).abs().max() > 1e-2 * scale  # the mirror does count
    with pytest.raises(FeatxError, match="tta must be one of none, flip"):
        LayerExtractor(model, layers, "cpu", precision="fp32", tta="rotate")
