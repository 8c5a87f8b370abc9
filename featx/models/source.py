"""The model-source seam: what a zoo of networks offers featx, and the registry of zoos.

A source is a module of `featx.models.zoos` (or an entry point of the group `featx.sources` of
an installed package) that implements `ModelSource` and calls `register_source` on itself when
imported. It must import cheaply (heavy libraries inside its functions), since `featx models`
and `featx layers` look sources up without building anything. Its models then appear in every
command, by name (a plain name such as `vgg16`) or behind its prefix (`timm:convnext_tiny`).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    from featx.models.layers import Layer
    from featx.models.weights import Weights

log = logging.getLogger(__name__)


@runtime_checkable
class ModelSource(Protocol):
    """A zoo: its names, each name's weight sets with their preprocessing, its layer table, its
    architecture and its pretrained state. `weights.source` of its pretrained sets is `NAME`."""

    NAME: str  # recorded with each model (ModelSpec.source)
    PREFIX: str  # "" for plain names, else what its names start with ("timm:")
    LIBRARY: str  # the package whose version its derived layer tables depend on
    SUMMARY: str  # one line for `featx models`

    def model_names(self) -> list[str]:
        """The names `featx models` lists and the shipped catalog holds (may be none)."""
        ...

    def knows(self, name: str) -> bool:
        """Whether a plain name is one of this source's models (a prefixed source: any name)."""
        ...

    def model_and_tag(self, name: str) -> tuple[str, str | None]:
        """The model a name means and the pretrained tag it names, if any
        (timm:convnext_tiny.fb_in1k -> timm:convnext_tiny, fb_in1k; vgg16 -> vgg16, None)."""
        ...

    def weight_sets(self, name: str) -> list[Weights]:
        """The pretrained weight sets of model `name`, the one `--weights imagenet` names first."""
        ...

    def local_weights(self, name: str, path: Path) -> Weights | None:
        """The weights a local file or folder holds when this source reads it itself (a checkpoint
        in its library's layout: source `file`, a tag starting with `local-`, the path as
        location), or None: a plain state dict that featx reads into the default architecture."""
        ...

    def build(self, name: str, tag: str | None, device: str = "meta") -> Any:
        """The architecture for weight set `tag` (a local checkpoint: its path; None: random
        weights), as a torch module on `device` (meta: no initialisation, the weights are
        assigned later)."""
        ...

    def layer_table(self, name: str, tag: str | None, size: int) -> tuple[list[Layer], list[str]]:
        """The layers a user may ask for at input `size` (for `tag` as in `build`), and the
        default ones."""
        ...

    def load_state(self, weights: Weights) -> tuple[dict, str]:
        """The pretrained state dict of `weights` (or of the local checkpoint it names) and a
        checksum of what it was read from (downloaded once by the library, or a clear FeatxError
        saying what to download)."""
        ...

    def tracer_kwargs(self, name: str) -> dict | None:
        """Arguments for torch.fx's tracer (modules to keep whole), or None."""
        ...


_SOURCES: dict[str, ModelSource] = {}


def register_source(source: ModelSource) -> ModelSource:
    """Make a source's models available everywhere (a later registration of a NAME replaces it)."""
    if not isinstance(source, ModelSource):
        raise TypeError(f"{source!r} does not implement ModelSource")
    _SOURCES[source.NAME] = source
    return source


def sources() -> list[ModelSource]:
    """Every registered source: the built-in ones (imported once) and the installed plugins."""
    _discover()
    return list(_SOURCES.values())


@cache
def _discover() -> None:
    package = importlib.import_module("featx.models.zoos")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    for entry in entry_points(group="featx.sources"):
        try:
            entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop featx
            log.warning("the model source plugin %s could not be loaded (%s: %s)", entry.name,
                        type(exc).__name__, exc)


def source_named(name: str) -> ModelSource:
    """The registered source whose NAME this is."""
    for source in sources():
        if source.NAME == name:
            return source
    raise KeyError(name)
