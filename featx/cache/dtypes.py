"""Features in the cache's dtype. float16 halves the cache and its reads; it is refused for a
layer whose values it would misrepresent (beyond its range, or rows so small that rounding
changes them by over 1%). The conversion and its check run where the features are, so on a GPU
only the stored bytes cross to the host."""

from __future__ import annotations

import numpy as np
import torch

from featx.errors import FeatxError
from featx.options import Dtype

DTYPES = (Dtype.FLOAT32, Dtype.FLOAT16)
FINE, OUT_OF_RANGE, TOO_SMALL = 0, 1, 2


def to_stored(values: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, dim) features -> (the features in `dtype`, a problem code as a 0-d int tensor on the
    same device), without waiting for the device: FINE, OUT_OF_RANGE or TOO_SMALL."""
    if dtype == "float32":
        return values.float(), torch.zeros((), dtype=torch.int8, device=values.device)
    half = values.to(torch.float16)
    exact = values.float()
    error = torch.linalg.vector_norm(half.float() - exact, dim=1)
    too_small = (error > 0.01 * torch.linalg.vector_norm(exact, dim=1)).any()
    out_of_range = ~torch.isfinite(half).all()
    code = torch.where(out_of_range, OUT_OF_RANGE, torch.where(too_small, TOO_SMALL, FINE))
    return half, code.to(torch.int8)


def check_stored(layer: str, code: int) -> None:
    """Raise the FeatxError a problem code stands for."""
    if code == OUT_OF_RANGE:
        raise FeatxError(f"layer {layer} has values beyond the float16 range; cache it as float32")
    if code == TOO_SMALL:
        raise FeatxError(f"layer {layer} has values too small for float16 (its smallest normal number is "
                         f"{np.finfo(np.float16).tiny:.1e}); cache it as float32")


def as_stored(layer: str, features: np.ndarray, dtype: str) -> np.ndarray:
    """Host features in the cache's dtype, checked; features already in it were checked where
    they were converted."""
    if features.dtype == np.dtype(dtype):
        return features
    stored, code = to_stored(torch.from_numpy(np.ascontiguousarray(features)), dtype)
    check_stored(layer, int(code))
    return stored.numpy()
