"""Build a registered network and put its weights in: pretrained weights are assigned to an
architecture made on the meta device, so no random initialisation runs only to be overwritten."""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import torch
from torch import nn

from featx.errors import FeatxError
from featx.models import ModelSpec
from featx.models.weights import Weights, state_dict_checksum


def _architecture(spec: ModelSpec, on_meta: bool) -> nn.Module:
    """The architecture of the spec's weights, on the meta device or (initialised) on the CPU."""
    return spec.zoo.build(spec.name, spec.weights.build_tag, "meta" if on_meta else "cpu")


def _state(spec: ModelSpec) -> tuple[dict, str]:
    """The state dict and its checksum: a plain state-dict file read here, anything else (a
    pretrained set, a local checkpoint in its library's layout) by the model's source."""
    if spec.weights.source == "file" and not spec.weights.local_checkpoint:
        return read_state_dict(Path(spec.weights.location)), spec.weights.checksum
    return spec.zoo.load_state(spec.weights)


def build_network(spec: ModelSpec, seed: int = 0) -> tuple[nn.Module, Weights]:
    """The network in eval mode and its weights with their checksum."""
    weights = spec.weights
    if weights.random:
        torch.manual_seed(seed)
        module = _architecture(spec, on_meta=False)
        return module.eval(), weights.with_checksum(state_dict_checksum(module.state_dict()))
    state, checksum = _state(spec)
    module = _architecture(spec, on_meta=True)
    try:
        module.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise FeatxError(f"weights {weights.describe()} do not fit {spec.name}: {first}") from None
    if any(t.is_meta for t in chain(module.parameters(), module.buffers())):
        module = _architecture(spec, on_meta=False)  # a buffer the state dict does not hold
        module.load_state_dict(state)
    return module.eval(), weights.with_checksum(checksum)


def read_state_dict(path: Path) -> dict:
    """A state dict from a local file, read with weights_only (no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused, not a torch file, ...
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        if any(word in first.lower() for word in ("weights_only", "weights only", "unsupported global")):
            first = "it holds Python objects besides tensors, which featx does not unpickle"
        raise FeatxError(f"cannot read weights file {path}: {first}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatxError(f"weights file {path} does not hold a state dict (names -> tensors)")
    return state
