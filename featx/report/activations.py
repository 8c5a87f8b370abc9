"""Feature maps of one image at one convolutional layer, drawn as a grid beside the input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from featx.data.preprocess import load
from featx.errors import FeatxError, OptionError
from featx.extract.forward import LayerExtractor
from featx.models import get_model, load_model
from featx.options import MAX_CHANNELS, check_count


def layer_maps(image: str | Path, model: str = "vgg16", layer: str = "conv1_1",
               *, weights: str = "imagenet", device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The cropped input (H, W, 3 uint8) and the layer's maps (C, h, w) for one image."""
    model_spec = get_model(model, weights)
    spec = model_spec.layer(layer)
    if not spec.spatial or spec.shape[1] != spec.shape[2]:
        raise FeatxError(f"layer {layer} of {model} has no spatial maps; choose a convolutional "
                         f"layer, one whose shape is channels x height x width")
    pixels = load(model_spec.preprocess, image)  # the image is read before the model is built
    loaded = load_model(model, weights)
    flat = LayerExtractor(loaded, [spec], device, precision="fp32")(pixels.unsqueeze(0))[layer][0]
    return pixels.permute(1, 2, 0).numpy(), flat.reshape(spec.shape).numpy()


def strongest_channels(maps: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` channels with the largest mean absolute response, in order."""
    if count < 1:
        raise OptionError("channels", f"must be at least 1, not {count}")
    energy = np.abs(maps).reshape(len(maps), -1).mean(axis=1)
    return np.sort(np.argsort(-energy, kind="stable")[:count])


def write_activation_grid(image: str | Path, out: str | Path, model: str = "vgg16",
                          *, layer: str = "conv1_1", channels: int = 16, weights: str = "imagenet",
                          device: str = "auto") -> Path:
    """Write a PNG (or SVG, by suffix) with the input image and a grid of `channels` feature
    maps (the most active ones), each scaled to its own range."""
    check_count("channels", channels, MAX_CHANNELS)
    try:
        from matplotlib import rc_context
    except ImportError:
        raise FeatxError("activation maps need matplotlib: pip install 'featx[plot]'") from None
    picture, maps = layer_maps(image, model, layer, weights=weights, device=device)
    chosen = strongest_channels(maps, min(channels, len(maps)))
    title = (f"{model} {layer}: {len(chosen)} of {len(maps)} feature maps ({maps.shape[1]}x{maps.shape[2]}), "
             f"weights {weights}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with rc_context({"text.parse_math": False}):  # names drawn as they are, never as mathematics
        _grid(picture, maps, chosen, title).savefig(out, dpi=120)
    return out


def _grid(picture: np.ndarray, maps: np.ndarray, chosen: np.ndarray, title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(3.2 + 1.6 * cols, max(3.4, 1.6 * rows + 0.6)), layout="constrained")
    FigureCanvasAgg(fig)
    outer = fig.add_gridspec(1, 2, width_ratios=[2, cols])
    ax = fig.add_subplot(outer[0])
    ax.imshow(picture)
    ax.set_title(f"input ({picture.shape[1]}x{picture.shape[0]} crop)", fontsize=9)
    ax.axis("off")
    grid = outer[1].subgridspec(rows, cols)
    for n, channel in enumerate(chosen):
        cell = fig.add_subplot(grid[n // cols, n % cols])
        cell.imshow(maps[channel], cmap="viridis")
        cell.set_title(f"channel {channel}", fontsize=7)
        cell.axis("off")
    fig.suptitle(title, fontsize=10)
    return fig

