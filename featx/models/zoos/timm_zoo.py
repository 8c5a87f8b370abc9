"""timm's models as `timm:<name>[.<tag>]` (extra `featx[timm]`): preprocessing from the pretrained
config (mean, std, crop_pct, interpolation, input size), stages from the model's feature_info,
then the global pool, a hidden classifier layer and the logits from its traced graph."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

from featx.errors import FeatxError
from featx.models.layers import Layer, derive_layers, stage_layers, trace_graph
from featx.models.source import register_source
from featx.models.weights import Preprocess, Weights, state_dict_checksum

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

NAME, PREFIX, LIBRARY = "timm", "timm:", "timm"
SUMMARY = "any timm model, e.g. timm:convnext_tiny.fb_in1k (featx[timm])"
EXTRA_MESSAGE = "timm models need the optional package timm: pip install 'featx[timm]'"


def _timm():
    try:
        import timm
    except ImportError:
        raise FeatxError(EXTRA_MESSAGE) from None
    return timm


def model_names() -> list[str]:
    return []  # open-ended: timm:<any timm model>


def knows(name: str) -> bool:
    return name.startswith(PREFIX)


def model_and_tag(name: str) -> tuple[str, str | None]:
    """timm:convnext_tiny.fb_in1k -> (timm:convnext_tiny, fb_in1k)."""
    model, _, tag = name.partition(".")
    return model, tag or None


def split_name(name: str) -> tuple[str, str | None]:
    """timm:convnext_tiny.fb_in1k -> (convnext_tiny, fb_in1k)."""
    arch, _, tag = name.removeprefix(PREFIX).partition(".")
    return arch, tag or None


def weight_sets(name: str) -> list[Weights]:
    """The pretrained tags timm knows for this architecture, its default tag first."""
    timm = _timm()
    arch, tag = split_name(name)
    if not timm.is_model(arch):
        raise FeatxError(f"timm has no model {arch!r} (timm.list_models('*{arch[:4]}*') lists near ones)")
    tags = [t.partition(".")[2] for t in timm.list_pretrained(arch + ".*") if t.partition(".")[0] == arch]
    default = timm.models.get_pretrained_cfg(arch)
    tags = sorted(set(tags), key=lambda t: (t != getattr(default, "tag", None), t))
    return [_weights(f"{PREFIX}{arch}", t, timm.models.get_pretrained_cfg(f"{arch}.{t}")) for t in tags]


def _weights(model: str, tag: str, cfg) -> Weights:
    size = cfg.input_size[-1]
    crop_pct = cfg.crop_pct or 0.875
    preprocess = Preprocess(resize=math.floor(size / crop_pct), crop=size, mean=tuple(cfg.mean),
                            std=tuple(cfg.std), interpolation=cfg.interpolation or "bilinear")
    location = f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or "")
    return Weights(model, tag, "timm", preprocess, location, "imagenet" if cfg.num_classes == 1000 else None,
                   note=f"timm {model.removeprefix(PREFIX)}.{tag}")


def local_weights(name: str, path: Path) -> None:
    return None  # a local file is a plain state dict


def build(name: str, tag: str | None = None, device: str = "meta") -> nn.Module:
    """The architecture (one per timm name, whatever `tag`), on the meta device (no weights)
    or initialised on the CPU."""
    import torch

    arch, _ = split_name(name)
    with torch.device(device):
        return _timm().create_model(arch, pretrained=False)


def load_state(weights: Weights) -> tuple[dict, str]:
    """The pretrained state dict, downloaded once by timm (through the hub cache), and its checksum."""
    arch, _ = split_name(weights.model)
    try:
        state = _timm().create_model(f"{arch}.{weights.tag}", pretrained=True).state_dict()
        return state, state_dict_checksum(state)
    except Exception as exc:  # noqa: BLE001 - no network, missing file: one message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FeatxError(f"timm could not load the pretrained weights {weights.name} from "
                         f"{weights.location} ({reason}); run once with network access, or pass a "
                         "local copy of its state dict with --weights PATH") from None


def tracer_kwargs(name: str = "") -> dict:
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules

    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def layer_table(name: str, tag: str | None, size: int) -> tuple[list[Layer], list[str]]:
    """Each feature_info stage (flattened and pooled, or class token and token mean), then the
    global pool, a hidden classifier layer and the logits."""
    module = build(name)
    kwargs = tracer_kwargs(name)
    nodes, output = trace_graph(module, size, kwargs)
    shapes: dict[str, tuple[int, ...] | None] = {}
    for node in nodes:  # the last node inside a module is its output
        for k in range(1, node.name.count(".") + 2):
            shapes[".".join(node.name.split(".")[:k])] = node.shape
    prefix = int(getattr(module, "num_prefix_tokens", 0) or 0)
    layers: list[Layer] = []
    for info in getattr(module, "feature_info", []) or []:
        where, shape = info["module"], shapes.get(info["module"])
        if not shape:
            continue
        if len(shape) in (2, 3):
            layers += stage_layers(where, where, shape, prefix_tokens=prefix)
    tail, _ = derive_layers(module, size, max(prefix, 1), tracer_kwargs=kwargs)
    tail = [layer for layer in tail if layer.name in ("pool", "pre_logits", "logits")]
    if not any(layer.name in ("pool", "pre_logits") for layer in tail):  # a transformer's head
        tail = _pre_logits(nodes, output) + tail
    layers += tail
    pooled = [layer.name for layer in layers if layer.reduce != "flatten" or layer.name == "pool"]
    return layers, list(dict.fromkeys(pooled[-3:] + [layers[-1].name]))


def _pre_logits(nodes: list, output: str) -> list[Layer]:
    """`pool`: the input of the classifier's last linear layer, what timm's
    `forward_head(pre_logits=True)` returns (a ViT's normed class token, or its token mean)."""
    by_name = {node.name: node for node in nodes}
    node = by_name.get(output)
    if node is None or node.kind != "Linear" or not node.inputs:
        return []
    node = by_name.get(node.inputs[0])
    while node is not None and node.kind in ("Dropout", "Identity") and node.inputs:
        node = by_name.get(node.inputs[0])
    if node is None or not node.shape or len(node.shape) != 1:
        return []
    return [Layer("pool", node.name, node.shape, "flatten",
                  "pre-logits feature (timm's forward_head(pre_logits=True))")]


register_source(sys.modules[__name__])
