"""torchvision's classifiers: every model of `torchvision.models.list_models`, its weight sets
with their own transforms, the builder arguments those weights need, and the familiar layer
names of the VGG and ResNet families (pool4, relu7, layer4, ...)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from featx.errors import FeatxError
from featx.models.layers import Layer, derive_layers, trace_graph
from featx.models.source import register_source
from featx.models.weights import Preprocess, Weights, file_checksum

if TYPE_CHECKING:
    from torch import nn

NAME, PREFIX, LIBRARY = "torchvision", "", "torchvision"
SUMMARY = "every classifier of torchvision.models, with its weight sets"

_AUX = ("aux1.", "aux2.", "AuxLogits.")  # auxiliary heads that only run in training


def model_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def knows(name: str) -> bool:
    return name in model_names()


def model_and_tag(name: str) -> tuple[str, None]:
    return name, None  # a weight set is named by --weights


def weight_sets(name: str) -> list[Weights]:
    """Every weight set torchvision has for `name`, IMAGENET1K_V1 first when there is one."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    members = sorted(enum, key=lambda w: (w.name != "IMAGENET1K_V1", w.name))
    return [Weights(name, w.name, "torchvision", Preprocess.from_transforms(w.transforms()), w.url,
                    "imagenet" if w.meta.get("categories") else None,
                    note=f"torchvision {enum.__name__}.{w.name}") for w in members]


def architecture_kwargs(name: str, tag: str | None) -> dict:
    """The builder arguments torchvision's own builder sets when it is given these weights."""
    import torchvision

    kwargs: dict = {}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False, transform_input=tag is not None)
    if tag is None:
        return kwargs
    meta = torchvision.models.get_weight(f"{_enum_name(name)}.{tag}").meta
    if meta.get("categories"):
        kwargs["num_classes"] = len(meta["categories"])
    if name.startswith("vit_"):
        kwargs["image_size"] = meta["min_size"][0]
    if name.startswith("maxvit_"):
        kwargs["input_size"] = meta["min_size"]
    return kwargs


def _enum_name(name: str) -> str:
    import torchvision

    return torchvision.models.get_model_weights(name).__name__


def local_weights(name: str, path: Path) -> None:
    return None  # a local file is a plain state dict


def build(name: str, tag: str | None, device: str = "meta") -> nn.Module:
    """The architecture for weight set `tag` (None: the builder's defaults): on the meta device
    (no random initialisation) where the builder allows it, else initialised on the CPU."""
    import torch
    import torchvision

    kwargs = architecture_kwargs(name, tag)
    try:
        with torch.device(device):
            return torchvision.models.get_model(name, weights=None, **kwargs)
    except (NotImplementedError, RuntimeError):  # a builder that computes with tensors (regnet)
        return torchvision.models.get_model(name, weights=None, **kwargs)


def load_state(weights: Weights) -> tuple[dict, str]:
    """The weights' state dict and file checksum, from the torch hub cache (downloaded once)."""
    import torch

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.location).name
    if not cached.is_file():
        try:
            torch.hub.load_state_dict_from_url(weights.location, model_dir=str(cached.parent),
                                               progress=True, check_hash=True)
        except Exception as exc:  # noqa: BLE001 - no network, proxy, bad hash: one message
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FeatxError(
                f"{weights.name} weights are not in the torch hub cache and could not be downloaded "
                f"({reason}). Expected file: {cached} (from {weights.location}). Either download it "
                f"there, or pass a local copy with --weights PATH.") from None
    state = torch.load(cached, map_location="cpu", weights_only=True, mmap=True)
    return {k: v for k, v in state.items() if not k.startswith(_AUX)}, file_checksum(cached)


def layer_table(name: str, tag: str | None, size: int) -> tuple[list[Layer], list[str]]:
    """The layer table at input `size`: derived from the traced graph, with the familiar names
    for the VGG and ResNet families."""
    module = build(name, tag)
    if name.startswith("vgg"):
        return _vgg_layers(module, size)
    layers, defaults = derive_layers(module, size)
    if re.match(r"(resnet|resnext|wide_resnet)\d", name):
        rename = {"relu": "conv1", "relu_pool": "conv1_pool"}
        layers = [Layer(rename.get(layer.name, layer.name), *_fields(layer)[1:]) for layer in layers]
        defaults = ["layer4", "pool"]
    return layers, defaults


def _fields(layer: Layer) -> tuple:
    return (layer.name, layer.node, layer.shape, layer.reduce, layer.description, layer.prefix_tokens)


def _vgg_layers(module: nn.Module, size: int) -> tuple[list[Layer], list[str]]:
    """conv1_1, pool1..pool5, fc6, relu6, fc7, relu7, logits of any VGG (with or without BN)."""
    from torch import nn

    shapes = {node.name: node.shape for node in trace_graph(module, size)[0]}
    pools = [i for i, m in enumerate(module.features) if isinstance(m, nn.MaxPool2d)]
    layers = [Layer("conv1_1", "features.0", shapes["features.0"],
                    description="first convolution, before its ReLU")]
    layers += [Layer(f"pool{k}", f"features.{i}", shapes[f"features.{i}"],
                     description=f"max-pool after block {k}") for k, i in enumerate(pools, start=1)]
    for node, name, text in (("classifier.0", "fc6", "first fully connected layer, before ReLU"),
                             ("classifier.1", "relu6", "fc6 after its ReLU"),
                             ("classifier.3", "fc7", "second fully connected layer, before ReLU"),
                             ("classifier.4", "relu7", "fc7 after its ReLU"),
                             ("classifier.6", "logits", "class scores")):
        layers.append(Layer(name, node, shapes[node], description=text))
    return layers, ["pool4", "pool5", "relu6", "relu7"]


def tracer_kwargs(name: str) -> dict | None:
    return None


register_source(sys.modules[__name__])
