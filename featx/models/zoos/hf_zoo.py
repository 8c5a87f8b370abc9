"""Hugging Face vision models as `hf:ORG/NAME` (extra `featx[hf]`), e.g. `hf:facebook/dinov2-small`,
`hf:openai/clip-vit-base-patch32`, `hf:google/siglip-base-patch16-224`: the checkpoint's vision
model (CLIP's and SigLIP's vision tower, not their text tower), built from its config through
transformers' Auto classes, with the checkpoint's own image processor settings turned into
featx's preprocessing (shortest-edge or square resize, crop, rescale, mean/std), which featx
applies to whole batches.

transformers' own forward records outputs through decorators and is not traceable by torch.fx,
so each family has a hook-free forward over the model's own modules (registered under their own
names: the state dict is the model's): the embeddings, each block and the head are kept whole
when traced, so that one pass returns every requested layer and stops at the deepest.

The configs and processor settings of a few popular checkpoints ship with featx (KNOWN), so
that their layer tables answer without a download; any other checkpoint's are read from the
Hugging Face cache, a local folder (`--weights PATH`) or downloaded once.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featx.errors import FeatxError
from featx.models.layers import Layer, stage_layers, trace_graph
from featx.models.source import register_source
from featx.models.weights import LOCAL_TAG, Preprocess, Weights, state_dict_checksum

if TYPE_CHECKING:
    from torch import nn

NAME, PREFIX, LIBRARY = "hf", "hf:", "transformers"
SUMMARY = "a Hugging Face vision model, e.g. hf:facebook/dinov2-small (featx[hf])"
EXTRA_MESSAGE = "hf models need the optional package transformers: pip install 'featx[hf]'"
HUB_TAG = "main"  # the weight set of a hub checkpoint: its main revision, as the Hugging Face cache holds it
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL codes
_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}

# Checkpoints known without a download: (vision config model_type, its arguments, image processor
# class, its arguments), as transformers' conversion scripts made them (DINOv2: Dinov2Config(
# image_size=518, patch_size=14) per size and BitImageProcessor(shortest_edge 256, bicubic, ImageNet
# mean/std); SigLIP: SiglipConfig's vision defaults per size and SiglipImageProcessor at the image
# size; CLIP: CLIPVisionConfig per size and CLIPImageProcessor's shortest-edge resize and crop).
_DINOV2 = {"image_size": 518, "patch_size": 14}
_BIT = ("BitImageProcessor", {"size": {"shortest_edge": 256}, "resample": 3, **_IMAGENET})
_CLIP_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16, "patch_size": 14, "projection_dim": 768}
_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
           "image_size": 384, "patch_size": 14}
KNOWN: dict[str, tuple[str, dict, str, dict]] = {
    "facebook/dinov2-small": ("dinov2", {**_DINOV2, "hidden_size": 384, "num_attention_heads": 6}, *_BIT),
    "facebook/dinov2-base": ("dinov2", _DINOV2, *_BIT),
    "facebook/dinov2-large": ("dinov2", {**_DINOV2, "hidden_size": 1024, "num_hidden_layers": 24,
                                         "num_attention_heads": 16}, *_BIT),
    "facebook/dinov2-giant": ("dinov2", {**_DINOV2, "hidden_size": 1536, "num_hidden_layers": 40,
                                         "num_attention_heads": 24, "use_swiglu_ffn": True}, *_BIT),
    "openai/clip-vit-base-patch32": ("clip_vision_model", {}, "CLIPImageProcessor", {}),
    "openai/clip-vit-base-patch16": ("clip_vision_model", {"patch_size": 16}, "CLIPImageProcessor", {}),
    "openai/clip-vit-large-patch14": ("clip_vision_model", _CLIP_L14, "CLIPImageProcessor", {}),
    "openai/clip-vit-large-patch14-336": (
        "clip_vision_model", {**_CLIP_L14, "image_size": 336}, "CLIPImageProcessor",
        {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}),
    "google/siglip-base-patch16-224": ("siglip_vision_model", {"image_size": 224, "patch_size": 16},
                                       "SiglipImageProcessor", {"size": {"height": 224, "width": 224}}),
    "google/siglip-so400m-patch14-384": ("siglip_vision_model", _SO400M, "SiglipImageProcessor",
                                         {"size": {"height": 384, "width": 384}}),
}


@dataclass(frozen=True)
class Family:
    """How featx runs one kind of vision model: its transformers class, the modules kept whole
    when traced (module of transformers.models, class names) and its hook-free forward."""

    model_class: str
    module: str
    leaves: tuple[str, ...]
    forward: Any  # (tower, pixels) -> the network's last output


def _transformers():
    try:
        import transformers
    except ImportError:
        raise FeatxError(EXTRA_MESSAGE) from None
    return transformers


# --- the hook-free forwards (traced by torch.fx with the leaves kept whole) ------------------

def _dinov2_forward(tower, pixels):
    """DINOv2: blocks, the final norm; pool is its class token (Dinov2Model's pooler_output),
    cls+mean the class token beside the mean of the patch tokens (DINOv2's linear evaluation)."""
    import torch

    hidden = tower.embeddings(pixels)
    for block in tower.encoder.layer:
        hidden = block(hidden)
    normed = tower.layernorm(hidden)
    return torch.cat([normed[:, 0], normed[:, tower.prefix_tokens:].mean(dim=1)], dim=1)


def _clip_forward(tower, pixels):
    """CLIP: the pre-norm, blocks, the normed class token (pooler_output), its projection (image_embeds)."""
    vision = tower.vision_model
    hidden = vision.pre_layrnorm(vision.embeddings(pixels))
    for block in vision.encoder.layers:
        hidden = block(hidden, None)
    return tower.visual_projection(vision.post_layernorm(hidden[:, 0]))


def _siglip_forward(tower, pixels):
    """SigLIP: blocks, the final norm, the attention-pooling head (pooler_output); without a head
    the mean of the normed tokens."""
    hidden = tower.embeddings(pixels)
    for block in tower.encoder.layers:
        hidden = block(hidden, None)
    normed = tower.post_layernorm(hidden)
    return tower.head(normed) if tower.use_head else normed.mean(dim=1)


def _vit_forward(tower, pixels):
    """ViT: blocks, the final norm, its class token (what ViTForImageClassification classifies)."""
    hidden = tower.embeddings(pixels)
    for block in tower.layers:
        hidden = block(hidden)
    return tower.layernorm(hidden)[:, 0]


def _convnext_forward(tower, pixels):
    """ConvNeXt: stages, then the normed global average (pooler_output)."""
    hidden = tower.embeddings(pixels)
    for stage in tower.encoder.stages:
        hidden = stage(hidden)
    return tower.layernorm(hidden.mean([-2, -1]))


FAMILIES = {  # by the vision config's model_type
    "dinov2": Family("Dinov2Model", "dinov2", ("Dinov2Embeddings", "Dinov2Layer"), _dinov2_forward),
    "dinov2_with_registers": Family(
        "Dinov2WithRegistersModel", "dinov2_with_registers",
        ("Dinov2WithRegistersEmbeddings", "Dinov2WithRegistersLayer"), _dinov2_forward),
    "clip_vision_model": Family(
        "CLIPVisionModelWithProjection", "clip", ("CLIPVisionEmbeddings", "CLIPEncoderLayer"), _clip_forward),
    "siglip_vision_model": Family(
        "SiglipVisionModel", "siglip",
        ("SiglipVisionEmbeddings", "SiglipEncoderLayer", "SiglipMultiheadAttentionPoolingHead"),
        _siglip_forward),
    "vit": Family("ViTModel", "vit", ("ViTEmbeddings", "ViTLayer"), _vit_forward),
    "convnext": Family(
        "ConvNextModel", "convnext", ("ConvNextEmbeddings", "ConvNextStage"), _convnext_forward),
}


@cache
def _tower_class() -> type:
    """The module featx runs: a vision model's own children under their own names (so its state
    dict), run by its family's forward. Made on first use, so that importing this source
    imports no torch."""
    from torch import nn

    class VisionTower(nn.Module):
        def __init__(self, model, model_type: str, prefix_tokens: int) -> None:
            super().__init__()
            for name, child in model.named_children():
                self.add_module(name, child)
            self.model_type = model_type
            self.prefix_tokens = prefix_tokens
            self.use_head = hasattr(model, "head")

        def forward(self, pixels):
            return FAMILIES[self.model_type].forward(self, pixels)

    return VisionTower


# --- names, configs and processor settings ---------------------------------------------------

def model_names() -> list[str]:
    return [PREFIX + repo for repo in KNOWN]


def knows(name: str) -> bool:
    return name.startswith(PREFIX)


def model_and_tag(name: str) -> tuple[str, None]:
    return name, None  # the whole name is the checkpoint (repository names may hold dots)


def _repo(model: str) -> str:
    repo = model.removeprefix(PREFIX)
    if not repo or repo.startswith("/") or repo.endswith("/"):
        raise FeatxError(f"{model!r} names no Hugging Face checkpoint; use hf:ORG/NAME, "
                         "e.g. hf:facebook/dinov2-small")
    return repo


@contextlib.contextmanager
def _quiet():
    """transformers' loading reports and progress bars off (featx says what it loads)."""
    logging = _transformers().utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _missing(model: str, exc: BaseException) -> FeatxError:
    """The one-line error for a checkpoint that is neither local nor downloadable."""
    from huggingface_hub import constants

    repo = _repo(model)
    reason = (" ".join(str(exc).split()) or type(exc).__name__).split(". ")[0].rstrip(".")  # first sentence
    return FeatxError(f"{model}: the checkpoint {repo} is not in the Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}) and could not be downloaded ({reason}); run once "
                      "with network access to download it, or pass a local copy with --weights PATH (a "
                      f"folder saved by save_pretrained, or a clone of https://huggingface.co/{repo})")


def _from_hub(load, model: str, *, shipped: bool = True, download: bool = True):
    """`load(repo, local_files_only)` from the Hugging Face cache; else None where featx ships
    the checkpoint's settings (and `shipped`) or where `download` is False; else downloaded (a
    clear FeatxError when that fails)."""
    repo = _repo(model)
    with _quiet():
        try:
            return load(repo, True)
        except (OSError, ValueError):  # not cached, or not usable as cached: ask the hub
            pass
        if (shipped and repo in KNOWN) or not download:
            return None
        try:
            return load(repo, False)
        except Exception as exc:  # noqa: BLE001 - no network, unknown repository, gated: one message
            raise _missing(model, exc) from None


def _read_folder(auto, folder: str):
    """An Auto class's object from a local checkpoint folder; a clear FeatxError when unreadable."""
    try:
        return auto.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()).split(". ")[0] or type(exc).__name__
        raise FeatxError(f"cannot read the checkpoint folder {folder}: {reason}") from None


def _vision_config(config):
    """The vision part of a checkpoint's config (CLIP's, SigLIP's), with CLIP's projection width."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return config
    if getattr(config, "projection_dim", None) is not None and hasattr(vision, "projection_dim"):
        vision.projection_dim = config.projection_dim
    return vision


def _config(model: str, folder: str | None, *, shipped: bool = True):
    """The vision config of a checkpoint: a local folder's, else the Hugging Face cache's, else
    the one featx ships (when `shipped`), else downloaded."""
    auto = _transformers().AutoConfig
    if folder:
        with _quiet():
            return _vision_config(_read_folder(auto, folder))
    found = _from_hub(lambda repo, local: auto.from_pretrained(repo, local_files_only=local), model,
                      shipped=shipped)
    if found is not None:
        return _vision_config(found)
    model_type, arguments, _, _ = KNOWN[_repo(model)]
    return auto.for_model(model_type, **arguments)


def _family(model: str, config) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise FeatxError(f"{model} is a {config.model_type} model; featx reads the vision models of the "
                         "types " + ", ".join(FAMILIES))
    return family


def _processor(model: str, folder: Path | None = None, *, download: bool = True):
    """The image processor of a checkpoint: a local folder's, else the Hugging Face cache's, else
    the settings featx ships, else downloaded (None where `download` is False)."""
    transformers = _transformers()
    auto = transformers.AutoImageProcessor
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        with _quiet():
            return _read_folder(auto, str(folder))
    found = _from_hub(lambda repo, local: auto.from_pretrained(repo, local_files_only=local), model,
                      download=download)
    if found is not None or _repo(model) not in KNOWN:
        return found
    _, _, kind, arguments = KNOWN[_repo(model)]
    return getattr(transformers, kind)(**arguments)


def _size(value, key: str) -> int | None:
    """A field of a processor's size (SizeDict, dict, or the int of older configs)."""
    if isinstance(value, int):
        return value if key in ("shortest_edge", "height", "width") else None
    if isinstance(value, dict):
        return value.get(key)
    return getattr(value, key, None)


def preprocess_of(processor, model: str) -> Preprocess:
    """featx's preprocessing from an image processor's settings: the shortest-edge resize and
    crop (ConvNeXt's crop_pct: shortest_edge / crop_pct, then the crop) or the square resize,
    the rescale folded into mean and std, the resample filter."""
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    shortest, height, width = (_size(size, key) for key in ("shortest_edge", "height", "width"))
    cropped = bool(getattr(processor, "do_center_crop", False)) and crop is not None
    crop_side = _size(crop, "height") if cropped else None
    if cropped and crop_side != _size(crop, "width"):
        raise FeatxError(f"{model} crops to a non-square size; featx crops square images only")
    crop_pct = getattr(processor, "crop_pct", None)
    if not getattr(processor, "do_resize", True):
        raise FeatxError(f"{model}'s image processor does not resize; featx needs a fixed input size")
    if shortest and crop_pct and shortest < 384:  # ConvNeXt: resize to shortest / crop_pct, crop shortest
        resize, mode, crop_side = int(shortest / crop_pct), "shortest", shortest
    elif shortest and crop_pct:  # ConvNeXt from 384 on: a square resize, no crop
        resize, mode, crop_side = shortest, "squash", shortest
    elif shortest:
        resize, mode, crop_side = shortest, "shortest", crop_side or shortest
    elif height and height == width:
        resize, mode, crop_side = height, "squash", crop_side or height
    else:
        raise FeatxError(f"{model} resizes images to {height}x{width}; featx needs square inputs")
    scale = 255 * float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    normalize = getattr(processor, "do_normalize", True)
    mean = tuple(float(m) / scale for m in processor.image_mean) if normalize else (0.0,) * 3
    std = tuple(float(s) / scale for s in processor.image_std) if normalize else (1 / scale,) * 3
    resample = getattr(processor, "resample", 2)
    interpolation = RESAMPLE.get(int(getattr(resample, "value", resample)), "bilinear")
    return Preprocess(resize=resize, crop=crop_side, mean=mean, std=std, interpolation=interpolation,
                      resize_mode=mode)


def weight_sets(name: str) -> list[Weights]:
    """The checkpoint's main revision, preprocessed as its image processor says."""
    repo = _repo(name)
    preprocess = preprocess_of(_processor(name), name)
    return [Weights(name, HUB_TAG, "hf", preprocess, f"https://huggingface.co/{repo}", None,
                    note=f"Hugging Face {repo}")]


def local_weights(name: str, path: Path) -> Weights | None:
    """A checkpoint folder (save_pretrained's layout, or a clone of the hub repository): its own
    config and image processor (else the named checkpoint's, when known offline). A file is a
    plain state dict of the vision model (None)."""
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file():
        raise FeatxError(f"{path} holds no config.json: not a Hugging Face checkpoint folder "
                         "(save_pretrained writes one)")
    processor = _processor(name, path, download=False)
    if processor is None:
        raise FeatxError(f"{path} holds no preprocessor_config.json and the image processor of "
                         f"{_repo(name)} is not in the Hugging Face cache; save the processor into that "
                         "folder too (AutoImageProcessor.from_pretrained(...).save_pretrained(PATH))")
    checksum = folder_checksum(path)
    return Weights(name, f"{LOCAL_TAG}{checksum[:12]}", "file", preprocess_of(processor, name),
                   str(path.resolve()), None, checksum[:16], note=str(path))


def folder_checksum(folder: Path) -> str:
    """sha256 over a checkpoint folder's config and the weight files transformers reads from it
    (safetensors when there are any, else PyTorch .bin files), by name and content."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    h = hashlib.sha256()
    for path in [folder / "config.json", *sorted(folder.glob("*.index.json")), *files]:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# --- the network -------------------------------------------------------------------------------

def _local_folder(tag: str | None) -> str | None:
    """The folder a build tag names (a local checkpoint's path), or None (the hub's, or random)."""
    return tag if tag and tag != HUB_TAG else None


def _tower(model, config):
    """The featx tower over a transformers vision model."""
    prefix = 0 if config.model_type in ("siglip_vision_model", "convnext") else \
        1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return _tower_class()(model, config.model_type, prefix)


def build(name: str, tag: str | None = None, device: str = "meta") -> nn.Module:
    """The tower over the checkpoint's vision model, built from its config (a local folder's when
    `tag` is its path), on the meta device (no weights) or initialised on the CPU."""
    import torch

    config = _config(name, _local_folder(tag))
    family = _family(name, config)
    model_class = getattr(_transformers(), family.model_class)
    extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
    with torch.device(device), _quiet():
        return _tower(model_class(config, **extra), config)


def load_state(weights: Weights) -> tuple[dict, str]:
    """The tower's state dict, loaded by transformers' from_pretrained (downloaded once into
    the Hugging Face cache, or from a local folder), and its checksum; weights a checkpoint
    lacks are refused, not initialised at random."""
    import torch

    folder = weights.location if weights.local_checkpoint else None
    where = folder or _repo(weights.model)
    config = _config(weights.model, folder, shipped=False)  # the checkpoint's own, downloaded with it
    family = _family(weights.model, config)
    model_class = getattr(_transformers(), family.model_class)
    extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
    with _quiet():
        try:
            model, info = model_class.from_pretrained(where, config=config, dtype=torch.float32,
                                                      output_loading_info=True, **extra)
        except OSError as exc:
            raise _missing(weights.model, exc) from None
        except (RuntimeError, ValueError) as exc:  # weights of other shapes than its config says
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "mismatched" in reason:
                reason = "its weights have other shapes than its config gives"
            raise FeatxError(f"{where} cannot be loaded as {family.model_class}: {reason}") from None
    if info["missing_keys"] or info["mismatched_keys"]:
        missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        raise FeatxError(f"{where} does not hold every weight of {family.model_class} (missing "
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    state = _tower(model, config).state_dict()
    return state, state_dict_checksum(state)


def tracer_kwargs(name: str = "") -> dict:
    """Every family's embeddings, blocks and heads kept whole when traced."""
    import importlib

    leaves = []
    for family in FAMILIES.values():
        module = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
        leaves += [getattr(module, leaf) for leaf in family.leaves]
    return {"leaf_modules": leaves}


def layer_table(name: str, tag: str | None, size: int) -> tuple[list[Layer], list[str]]:
    """Each block's class token and patch-token mean (ConvNeXt: each stage flattened and pooled),
    then pool (the model's own image feature), CLIP's embed (after the projection), DINOv2's
    cls+mean."""
    tower = build(name, tag)
    try:
        nodes, output = trace_graph(tower, size, tracer_kwargs(name))
    except (RuntimeError, ValueError) as exc:  # an image size the model refuses
        reason = str(exc.__cause__ or exc).splitlines()[0]
        raise FeatxError(f"{name} cannot run on the {size}x{size} crops its image processor makes "
                         f"({reason})") from None
    shapes = {node.name: node.shape for node in nodes}
    by_name = {node.name: node for node in nodes}
    kind = tower.model_type
    blocks = {"dinov2": "encoder.layer", "dinov2_with_registers": "encoder.layer", "vit": "layers",
              "clip_vision_model": "vision_model.encoder.layers", "siglip_vision_model": "encoder.layers",
              "convnext": "encoder.stages"}[kind]
    count = len(tower.get_submodule(blocks))
    label = "stage" if kind == "convnext" else "block"
    layers = [layer for i in range(count) for layer in stage_layers(
        f"{label}{i}", f"{blocks}.{i}", shapes[f"{blocks}.{i}"], prefix_tokens=tower.prefix_tokens)]
    last = by_name[output]
    if kind.startswith("dinov2"):
        pool = by_name[last.inputs[0]]
        layers += [Layer("pool", pool.name, pool.shape, "flatten",
                         "class token after the final norm (pooler_output)"),
                   Layer("cls+mean", output, last.shape, "flatten",
                         "class token and mean of the patch tokens after the final norm")]
    elif kind == "clip_vision_model":
        norm = "vision_model.post_layernorm"
        layers += [Layer("pool", norm, shapes[norm], "flatten",
                         "normed class token before the projection (pooler_output)"),
                   Layer("embed", output, last.shape, "flatten",
                         "image embedding (image_embeds, not normalised)")]
    else:
        described = {"siglip_vision_model": "attention-pooled image feature (pooler_output)" if tower.use_head
                     else "mean of the normed tokens", "vit": "class token after the final norm",
                     "convnext": "normed global average pool (pooler_output)"}[kind]
        layers.append(Layer("pool", output, last.shape, "flatten", described))
    return layers, _defaults(layers)


def _defaults(layers: list[Layer]) -> list[str]:
    """A middle and the last block's class token (else token mean, else the last two pooled
    stages), then the model's own image features."""
    tokens = [layer.name for layer in layers if layer.reduce == "cls_token"] or \
        [layer.name for layer in layers if layer.reduce == "mean_tokens"]
    pooled = [layer.name for layer in layers if layer.reduce.startswith("avgpool")]
    picked = [tokens[len(tokens) // 2], tokens[-1]] if tokens else pooled[-2:]
    return list(dict.fromkeys(picked + [layer.name for layer in layers if layer.reduce == "flatten"
                                        and len(layer.shape) == 1]))


register_source(sys.modules[__name__])
