"""Generate the small procedural demo image dataset used by the README and tests.

The script draws four texture classes with numpy only and writes them as JPEG
files with Pillow::

    data/demo/<class>/img_NNN.jpg

Classes:

* ``stripes``      -- parallel bands with random orientation, period and colours.
* ``checkerboard`` -- a rotated two-colour checkerboard with random cell size.
* ``disks``        -- randomly placed, sized and coloured filled circles.
* ``gradient``     -- smooth linear or radial colour gradients.

Every image has random colours (so classes cannot be told apart by mean colour
alone) plus a little pixel noise. All randomness comes from one seeded
generator per class, so rerunning with the same arguments rewrites
byte-identical files. Stale ``*.jpg`` files in the class folders being written
are removed first.

Usage::

    python data/make_demo.py [--out DIR] [--per-class N] [--seed S]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 128
JPEG_QUALITY = 90
MIX = 0.5  # each image carries up to this share of another class's texture
NOISE = 30.0  # pixel noise, standard deviation on 0..255
DEFAULT_OUT = Path(__file__).resolve().parent / "demo"

Array = np.ndarray
Drawer = Callable[[np.random.Generator], Array]


def _grid() -> tuple[Array, Array]:
    """Return pixel-centre coordinates ``(y, x)`` of a SIZE x SIZE image."""
    coords = np.arange(SIZE, dtype=np.float64) + 0.5
    return np.meshgrid(coords, coords, indexing="ij")


def _random_colour(rng: np.random.Generator) -> Array:
    """Return a random RGB colour in [0, 255] as a float array of shape (3,)."""
    return rng.uniform(0.0, 255.0, size=3)


def _two_colours(rng: np.random.Generator, min_dist: float = 120.0) -> tuple[Array, Array]:
    """Return two random colours that differ by at least ``min_dist`` (Euclidean)."""
    while True:
        a, b = _random_colour(rng), _random_colour(rng)
        if np.linalg.norm(a - b) >= min_dist:
            return a, b


def _blend(mask: Array, a: Array, b: Array) -> Array:
    """Mix colour ``a`` (mask 0) and ``b`` (mask 1) per pixel; returns HxWx3 floats."""
    m = mask[..., None]
    return (1.0 - m) * a + m * b


def _soft_step(signed_dist: Array, width: float = 0.75) -> Array:
    """Anti-aliased step: 0 well below zero, 1 well above, linear ramp in between."""
    return np.clip(0.5 + signed_dist / (2.0 * width), 0.0, 1.0)


def draw_stripes(rng: np.random.Generator) -> Array:
    """Draw parallel stripes with random angle, period, phase, duty cycle and colours."""
    y, x = _grid()
    theta = rng.uniform(0.0, np.pi)
    period = rng.uniform(10.0, 28.0)
    duty = rng.uniform(0.35, 0.65)
    t = x * np.cos(theta) + y * np.sin(theta) + rng.uniform(0.0, period)
    frac = np.mod(t, period)
    # Signed distance (in pixels) to the nearest stripe edge, positive inside.
    inside = np.minimum(frac, duty * period - frac)
    outside = -np.minimum(frac - duty * period, period - frac)
    signed = np.where(frac < duty * period, inside, outside)
    a, b = _two_colours(rng)
    return _blend(_soft_step(signed), a, b)


def draw_checkerboard(rng: np.random.Generator) -> Array:
    """Draw a checkerboard with random rotation, cell size, offset and colours."""
    y, x = _grid()
    theta = rng.uniform(0.0, np.pi / 2)
    cell = rng.uniform(10.0, 24.0)
    u = (x * np.cos(theta) + y * np.sin(theta)) / cell + rng.uniform(0.0, 2.0)
    v = (-x * np.sin(theta) + y * np.cos(theta)) / cell + rng.uniform(0.0, 2.0)
    # Smooth square waves in [-1, 1]; their product gives an anti-aliased board.
    su = np.clip((0.5 - np.abs(np.mod(u, 2.0) - 1.0)) * cell / 0.75, -1.0, 1.0)
    sv = np.clip((0.5 - np.abs(np.mod(v, 2.0) - 1.0)) * cell / 0.75, -1.0, 1.0)
    mask = 0.5 + 0.5 * su * sv
    a, b = _two_colours(rng)
    return _blend(mask, a, b)


def draw_disks(rng: np.random.Generator) -> Array:
    """Draw randomly placed filled circles of random radius and colour on a plain ground."""
    y, x = _grid()
    background = _random_colour(rng)
    img = np.broadcast_to(background, (SIZE, SIZE, 3)).copy()
    for _ in range(int(rng.integers(6, 15))):
        cy, cx = rng.uniform(0.0, SIZE, size=2)
        radius = rng.uniform(7.0, 22.0)
        colour = _random_colour(rng)
        while np.linalg.norm(colour - background) < 100.0:
            colour = _random_colour(rng)
        dist = np.hypot(y - cy, x - cx)
        mask = _soft_step(radius - dist)[..., None]
        img = (1.0 - mask) * img + mask * colour
    return img


def draw_gradient(rng: np.random.Generator) -> Array:
    """Draw a smooth linear or radial gradient between two random colours."""
    y, x = _grid()
    if rng.random() < 0.5:
        theta = rng.uniform(0.0, 2.0 * np.pi)
        t = (x - SIZE / 2) * np.cos(theta) + (y - SIZE / 2) * np.sin(theta)
        t = (t - t.min()) / (t.max() - t.min())
    else:
        cy, cx = rng.uniform(0.0, SIZE, size=2)
        d = np.hypot(y - cy, x - cx)
        t = d / d.max()
    t = t ** rng.uniform(0.6, 1.6)
    a, b = _two_colours(rng)
    return _blend(t, a, b)


CLASSES: dict[str, Drawer] = {
    "stripes": draw_stripes,
    "checkerboard": draw_checkerboard,
    "disks": draw_disks,
    "gradient": draw_gradient,
}


def render(drawer: Drawer, rng: np.random.Generator, others: list[Drawer], mix: float,
           noise: float) -> Image.Image:
    """Draw one image with ``drawer``, blend in a texture of another class with a weight drawn
    from [0, ``mix``], add pixel noise of standard deviation ``noise``; return an RGB image."""
    img = drawer(rng)
    if mix > 0:
        weight = rng.uniform(0.0, mix)
        img = (1.0 - weight) * img + weight * others[int(rng.integers(len(others)))](rng)
    img = img + rng.normal(0.0, noise, size=img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def generate(out: Path, per_class: int, seed: int, mix: float = MIX, noise: float = NOISE) -> list[Path]:
    """Write ``per_class`` images for every class under ``out``; return written paths."""
    written: list[Path] = []
    seeds = np.random.SeedSequence(seed).spawn(len(CLASSES))
    for (name, drawer), class_seed in zip(CLASSES.items(), seeds, strict=True):
        rng = np.random.default_rng(class_seed)
        class_dir = out / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for stale in class_dir.glob("*.jpg"):
            stale.unlink()
        for i in range(per_class):
            path = class_dir / f"img_{i:03d}.jpg"
            others = [other for other in CLASSES.values() if other is not drawer]
            render(drawer, rng, others, mix, noise).save(path, format="JPEG", quality=JPEG_QUALITY,
                                                         optimize=False)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Parse command-line arguments and generate the dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--per-class", type=int, default=24, help="images per class")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--mix", type=float, default=MIX, help="largest weight of another class's texture")
    parser.add_argument("--noise", type=float, default=NOISE, help="pixel noise standard deviation")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
    paths = generate(args.out, args.per_class, args.seed, args.mix, args.noise)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} images ({total / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
