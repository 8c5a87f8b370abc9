"""open_clip's image towers as `openclip:ARCH/TAG` (extra `featx[clip]`), e.g.
`openclip:ViT-B-32/laion2b_s34b_b79k`: the image tower only, built from open_clip's model config
(QuickGELU where the tag was trained with it), the weights of the pretrained tag (downloaded once
by open_clip) or of a local checkpoint file, and the preprocessing open_clip pairs with the tag
(input size, resize mode, interpolation, mean/std).

Layers: each transformer block's class token and patch-token mean (a ResNet's stages, a timm
trunk's feature_info stages), `pool` (the image feature before the projection) and `embed` (what
encode_image returns, before its normalisation), from the traced graph.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from featx.errors import FeatxError
from featx.models.layers import Layer, stage_layers, trace_graph
from featx.models.source import register_source
from featx.models.weights import LOCAL_TAG, Preprocess, Weights, file_checksum

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

NAME, PREFIX, LIBRARY = "openclip", "openclip:", "open-clip-torch"
SUMMARY = "any open_clip image tower, e.g. openclip:ViT-B-32/laion2b_s34b_b79k (featx[clip])"
EXTRA_MESSAGE = "openclip models need the optional package open-clip-torch: pip install 'featx[clip]'"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults when a tag names none
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise FeatxError(EXTRA_MESSAGE) from None
    return open_clip


def model_names() -> list[str]:
    return []  # open-ended: openclip:<any open_clip architecture>/<tag>


def knows(name: str) -> bool:
    return name.startswith(PREFIX)


def model_and_tag(name: str) -> tuple[str, str | None]:
    """openclip:ViT-B-32/laion2b_s34b_b79k -> (openclip:ViT-B-32, laion2b_s34b_b79k)."""
    model, _, tag = name.partition("/")
    return model, tag or None


def _config(model: str) -> dict:
    """open_clip's config of an architecture (shipped with open_clip: no download)."""
    arch = model.removeprefix(PREFIX)
    config = _open_clip().get_model_config(arch)
    if config is None:
        raise FeatxError(f"open_clip has no model {arch!r} (open_clip.list_models() lists them, "
                         "open_clip.list_pretrained() their tags)")
    return config


def weight_sets(name: str) -> list[Weights]:
    """The pretrained tags open_clip knows for this architecture, in its own order."""
    open_clip = _open_clip()
    arch = name.removeprefix(PREFIX)
    config = _config(name)
    return [_weights(name, tag, config, open_clip.get_pretrained_cfg(arch, tag))
            for tag in open_clip.list_pretrained_tags_by_model(arch)]


def _weights(model: str, tag: str, config: dict, pretrained: dict) -> Weights:
    """A tag's weight set: its preprocessing at the tower's input size and where it comes from."""
    size = config["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise FeatxError(f"{model} takes {size[0]}x{size[1]} images; featx crops square images only")
        size = size[0]
    mode = pretrained.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise FeatxError(f"{model}/{tag} resizes images as open_clip's {mode!r}, which featx does not do")
    preprocess = Preprocess(resize=size, crop=size, mean=tuple(pretrained.get("mean", OPENAI_MEAN)),
                            std=tuple(pretrained.get("std", OPENAI_STD)),
                            interpolation=pretrained.get("interpolation", "bicubic"), resize_mode=mode)
    hub = pretrained.get("hf_hub", "")
    location = f"hf-hub:{hub}" if hub else pretrained.get("url", "")
    return Weights(model, tag, "openclip", preprocess, location, None,
                   note=f"open_clip {model.removeprefix(PREFIX)} {tag}")


def local_weights(name: str, path: Path) -> Weights | None:
    """A checkpoint file (open_clip's, a whole CLIP model or its image tower; .bin, .pt,
    .safetensors), preprocessed as the tag the name gives (else the architecture's first)."""
    if not path.is_file():
        return None
    model, tag = model_and_tag(name)
    sets = weight_sets(model)
    named = [w for w in sets if w.tag == tag] if tag else sets[:1]
    if tag and not named:
        raise FeatxError(f"{model} has no pretrained tag {tag!r}; its tags: "
                         + ", ".join(w.tag for w in sets))
    preprocess = named[0].preprocess if named else _weights(model, "", _config(model), {}).preprocess
    checksum = file_checksum(path)
    like = named[0].tag if named else "open_clip's default"
    return Weights(model, f"{LOCAL_TAG}{checksum[:12]}", "file", preprocess, str(path.resolve()), None,
                   checksum[:16], note=f"{path}, preprocessed as {like}")


def _quick_gelu(model: str, tag: str | None) -> bool:
    """Whether the tower uses QuickGELU: its config says so, or its pretrained tag was trained so."""
    pretrained = _open_clip().get_pretrained_cfg(model.removeprefix(PREFIX), tag) if tag else {}
    return bool(_config(model).get("quick_gelu", False) or pretrained.get("quick_gelu", False))


def build(name: str, tag: str | None = None, device: str = "meta") -> nn.Module:
    """The image tower for tag `tag` (a local checkpoint's path or None: the config's own
    activation), on the meta device (no weights) or initialised on the CPU; no text tower."""
    import torch
    from open_clip.model import _build_vision_tower

    config = _config(name)
    with torch.device(device):
        return _build_vision_tower(config["embed_dim"], config["vision_cfg"],
                                   quick_gelu=_quick_gelu(name, tag))


def load_state(weights: Weights) -> tuple[dict, str]:
    """The image tower's state dict from the tag's checkpoint (downloaded once by open_clip, into
    the Hugging Face cache or ~/.cache/clip) or a local file, and the file's checksum."""
    open_clip = _open_clip()
    if weights.local_checkpoint:
        path, checksum = weights.location, weights.checksum
    else:
        path = _download(weights)
        checksum = file_checksum(path)
    try:
        state = open_clip.factory.load_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - not a torch or safetensors file, pickled objects: one message
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FeatxError(f"cannot read open_clip checkpoint {path}: {reason}") from None
    tower = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return tower or state, checksum  # a whole CLIP model's checkpoint, or the tower's own state


def _download(weights: Weights) -> str:
    """The local path of a tag's checkpoint, downloaded by open_clip when it is not cached."""
    open_clip = _open_clip()
    pretrained = open_clip.get_pretrained_cfg(weights.model.removeprefix(PREFIX), weights.tag)
    try:
        return open_clip.pretrained.download_pretrained(pretrained)
    except Exception as exc:  # noqa: BLE001 - no network, proxy, missing file: one message
        from huggingface_hub import constants

        reason = (" ".join(str(exc).split()) or type(exc).__name__).split(". ")[0].rstrip(".")
        cache = constants.HF_HUB_CACHE if pretrained.get("hf_hub") else "~/.cache/clip"
        raise FeatxError(
            f"{weights.name} weights are not in open_clip's cache ({cache}) and could not be downloaded "
            f"from {weights.location} ({reason}); run once with network access, or pass a local "
            "copy of the checkpoint file (open_clip_pytorch_model.bin or .safetensors) with --weights PATH"
        ) from None


def tracer_kwargs(name: str = "") -> dict | None:
    """timm's untraceable modules and functions for a tower built on a timm trunk, else none."""
    try:
        timm_trunk = "timm_model_name" in _config(name.partition("/")[0])["vision_cfg"]
    except FeatxError:
        return None
    if not timm_trunk:
        return None
    from featx.models.zoos.timm_zoo import tracer_kwargs as timm_kwargs

    return timm_kwargs()


def layer_table(name: str, tag: str | None, size: int) -> tuple[list[Layer], list[str]]:
    """Each block's class token and token mean (a ResNet's or timm trunk's stages flattened and
    pooled), then `pool` (before the projection) and `embed` (after it)."""
    tower = build(name, tag)
    side = _config(name)["vision_cfg"].get("image_size", 224)
    if size != (side[0] if isinstance(side, (list, tuple)) else side):
        raise FeatxError(f"{name} takes {side}-pixel images, not the {size} its weights' preprocessing "
                         "crops; name one of its pretrained tags (openclip:ARCH/TAG)")
    nodes, output = trace_graph(tower, size, tracer_kwargs(name))
    shapes: dict[str, tuple[int, ...] | None] = {}
    for node in nodes:  # a module's last node is its output
        for k in range(1, node.name.count(".") + 2):
            shapes[".".join(node.name.split(".")[:k])] = node.shape
    by_name = {node.name: node for node in nodes}
    layers = _stage_layers(tower, shapes)
    embed = by_name[output]
    before = None  # the image feature the projection takes: open_clip's own proj, or a timm trunk's head
    if embed.kind == "matmul" and embed.inputs:
        before = by_name[embed.inputs[0]]
    elif hasattr(tower, "trunk") and embed.kind != "Identity":
        before = next((node for node in reversed(nodes) if node.name.startswith("trunk.")), None)
    if before is not None and before.shape and len(before.shape) == 1:
        layers.append(Layer("pool", before.name, before.shape, "flatten",
                            "image feature before the projection"))
    layers.append(Layer("embed", output, embed.shape, "flatten",
                        "image embedding (encode_image, not normalised)"))
    return layers, _defaults(layers)


def _stage_layers(tower, shapes: dict[str, tuple[int, ...] | None]) -> list[Layer]:
    """The blocks of open_clip's ViT, the stages of its ResNet or of a timm trunk."""
    if hasattr(tower, "transformer") and hasattr(tower.transformer, "resblocks"):
        places = [f"transformer.resblocks.{i}" for i in range(len(tower.transformer.resblocks))]
        return [layer for i, place in enumerate(places)
                for layer in stage_layers(f"block{i}", place, shapes[place], prefix_tokens=1)]
    if all(hasattr(tower, f"layer{k}") for k in range(1, 5)):  # open_clip's ModifiedResNet
        return [layer for k in range(1, 5)
                for layer in stage_layers(f"layer{k}", f"layer{k}", shapes[f"layer{k}"], prefix_tokens=0)]
    if hasattr(tower, "trunk"):
        prefix = int(getattr(tower.trunk, "num_prefix_tokens", 0) or 0)
        stages = []
        for info in getattr(tower.trunk, "feature_info", []) or []:
            place = f"trunk.{info['module']}"
            if shapes.get(place) and len(shapes[place]) in (2, 3):
                stages += stage_layers(info["module"], place, shapes[place], prefix_tokens=prefix)
        return stages
    return []


def _defaults(layers: list[Layer]) -> list[str]:
    """A middle and the last block's class token (or the last two pooled stages), pool, embed."""
    tokens = [layer.name for layer in layers if layer.reduce == "cls_token"] or \
        [layer.name for layer in layers if layer.reduce == "mean_tokens"]
    pooled = [layer.name for layer in layers if layer.reduce.startswith("avgpool")]
    picked = [tokens[len(tokens) // 2], tokens[-1]] if tokens else pooled[-2:]
    heads = [layer.name for layer in layers if layer.name in ("pool", "embed")]
    return list(dict.fromkeys(picked + heads))


register_source(sys.modules[__name__])
