"""Generate the bundled demo image set: procedural paintings in one fixed style.

Every image is a simple object (circle, star, house, tree, ...) painted the same way: flat
colours from a fixed palette, thick dark-brown outlines, concentric brush-like rings around the
object, a warm paper tint and grain. The style is what a LoRA trained on the set should learn;
each caption names the content in plain words and ends with the style token "opdiff style".

Usage: ``python assets/make_demo_data.py [--out assets/demo-data] [--count 24]``
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

DEFAULT_OUT = Path(__file__).resolve().parent / "demo-data"
SEED = 0
SIZE = 128  # saved image side, px
SCALE = 2  # drawn at SIZE * SCALE and downsampled, for smooth edges
STYLE_TOKEN = "opdiff style"

# The palette is part of the style: muted, warm-leaning tones only.
PALETTE = {
    "red": (196, 62, 44),
    "orange": (226, 128, 46),
    "yellow": (232, 186, 62),
    "pink": (222, 126, 130),
    "green": (110, 140, 70),
    "teal": (58, 124, 120),
    "blue": (64, 98, 148),
    "purple": (118, 74, 120),
    "cream": (238, 222, 186),
}
OUTLINE = (46, 28, 20)  # dark brown ink
TRUNK = (112, 70, 40)
RGB = tuple[int, int, int]
Part = tuple[Image.Image, RGB]  # an "L" mask (255 = inside) and the colour painted there
PLACES = {
    "in the center": (0.5, 0.5),
    "on the left": (0.36, 0.5),
    "on the right": (0.64, 0.5),
    "at the top": (0.5, 0.38),
    "at the bottom": (0.5, 0.62),
}


@dataclass(frozen=True)
class Scene:
    """What one image shows; the caption is derived from it."""

    obj: str
    color: str
    background: str
    place: str

    def caption(self) -> str:
        """Return the caption, e.g. 'a painting of a red star on the left on a blue background, opdiff style'."""
        return (
            f"a painting of {_article(self.color)} {self.color} {self.obj} {self.place} "
            f"on {_article(self.background)} {self.background} background, {STYLE_TOKEN}"
        )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scenes(count: int, seed: int = SEED) -> list[Scene]:
    """Return ``count`` distinct scenes cycling through every object, with seeded colours and places."""
    colors = list(PALETTE)
    places = list(PLACES)
    per_object = len(colors) * (len(colors) - 1) * len(places)
    if not 0 < count <= per_object * len(OBJECTS):
        raise ValueError(f"count must be in 1..{per_object * len(OBJECTS)}, got {count}")
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    for i in range(count):
        scene = None
        while scene is None or scene in out:  # distinct captions: each image says something new
            color = colors[rng.integers(len(colors))]
            # The object must stand out from its background.
            background = colors[rng.choice([j for j, c in enumerate(colors) if c != color])]
            scene = Scene(OBJECTS[i % len(OBJECTS)], color, background, places[rng.integers(len(places))])
        out.append(scene)
    return out


def _polygon_mask(points: list[tuple[float, float]], side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return mask


def _ellipse_mask(cx: float, cy: float, rx: float, ry: float, side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    return mask


def _star(
    cx: float, cy: float, r_out: float, r_in: float, n: int, turn: float = 0.0
) -> list[tuple[float, float]]:
    """Return the vertices of an n-pointed star (alternating outer and inner radius)."""
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = turn - math.pi / 2 + k * math.pi / n
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _rect(x0: float, y0: float, x1: float, y1: float, side: int) -> Image.Image:
    return _polygon_mask([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], side)


def _other(color: RGB, preferred: str, fallback: str) -> RGB:
    """Return the preferred palette colour for a detail, or the fallback when it equals the body's."""
    return PALETTE[preferred] if PALETTE[preferred] != color else PALETTE[fallback]


# Each object: (cx, cy, s, side, color) -> parts painted in order; s is the half-size in drawn px.
def _circle(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    return [(_ellipse_mask(cx, cy, s, s, side), color)]


def _square(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    # A slight tilt reads as hand-painted rather than geometric.
    corners = [0.1 + math.pi / 4 + k * math.pi / 2 for k in range(4)]
    return [(_polygon_mask([(cx + s * math.cos(a), cy + s * math.sin(a)) for a in corners], side), color)]


def _triangle(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    return [(_polygon_mask([(cx, cy - s), (cx + s, cy + 0.8 * s), (cx - s, cy + 0.8 * s)], side), color)]


def _star5(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    return [(_polygon_mask(_star(cx, cy, s, 0.45 * s, 5), side), color)]


def _house(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    roof = [(cx - 0.95 * s, cy - 0.1 * s), (cx, cy - s), (cx + 0.95 * s, cy - 0.1 * s)]
    return [
        (_rect(cx - 0.7 * s, cy - 0.1 * s, cx + 0.7 * s, cy + s, side), color),
        (_polygon_mask(roof, side), _other(color, "red", "purple")),
        (_rect(cx - 0.18 * s, cy + 0.4 * s, cx + 0.18 * s, cy + s, side), OUTLINE),  # door
    ]


def _tree(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    trunk = [(cx - 0.15 * s, cy), (cx + 0.15 * s, cy), (cx + 0.2 * s, cy + s), (cx - 0.2 * s, cy + s)]
    return [
        (_polygon_mask(trunk, side), TRUNK),
        (_ellipse_mask(cx, cy - 0.25 * s, 0.75 * s, 0.7 * s, side), color),
    ]


def _sun(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    rays = _polygon_mask(_star(cx, cy, s, 0.72 * s, 12), side)
    return [(rays, color), (_ellipse_mask(cx, cy, 0.55 * s, 0.55 * s, side), color)]


def _flower(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    petals = Image.new("L", (side, side), 0)
    for k in range(6):
        px, py = cx + 0.55 * s * math.cos(k * math.pi / 3), cy + 0.55 * s * math.sin(k * math.pi / 3)
        petals = ImageChops.lighter(petals, _ellipse_mask(px, py, 0.42 * s, 0.42 * s, side))  # union
    return [
        (petals, color),
        (_ellipse_mask(cx, cy, 0.3 * s, 0.3 * s, side), _other(color, "yellow", "orange")),
    ]


def _heart(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    t = np.linspace(0, 2 * math.pi, 90, endpoint=False)
    x = 16 * np.sin(t) ** 3  # the classic heart curve, spanning about 34 x 29 units
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [(_polygon_mask(list(zip(cx + s * x / 17, cy + s * (y + 2) / 17, strict=True)), side), color)]


def _moon(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    bite = _ellipse_mask(cx + 0.45 * s, cy - 0.2 * s, 0.85 * s, 0.85 * s, side)
    return [(ImageChops.subtract(_ellipse_mask(cx, cy, s, s, side), bite), color)]


def _fish(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    tail = [(cx - 0.45 * s, cy), (cx - s, cy - 0.45 * s), (cx - s, cy + 0.45 * s)]
    return [
        (_polygon_mask(tail, side), color),
        (_ellipse_mask(cx + 0.15 * s, cy, 0.75 * s, 0.45 * s, side), color),
        (_ellipse_mask(cx + 0.5 * s, cy - 0.1 * s, 0.08 * s, 0.08 * s, side), OUTLINE),  # eye
    ]


def _mountain(cx: float, cy: float, s: float, side: int, color: RGB) -> list[Part]:
    peak = [(cx - s, cy + 0.8 * s), (cx - 0.1 * s, cy - s), (cx + s, cy + 0.8 * s)]
    cap = [(cx - 0.42 * s, cy - 0.2 * s), (cx - 0.1 * s, cy - s), (cx + 0.28 * s, cy - 0.2 * s)]
    return [(_polygon_mask(peak, side), color), (_polygon_mask(cap, side), _other(color, "cream", "blue"))]


SHAPES = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star5,
    "house": _house,
    "tree": _tree,
    "sun": _sun,
    "flower": _flower,
    "heart": _heart,
    "moon": _moon,
    "fish": _fish,
    "mountain": _mountain,
}
OBJECTS = tuple(SHAPES)


def rings(side: int, cx: float, cy: float, period: float, phase: float) -> np.ndarray:
    """Return a (side, side) brightness factor of wobbly concentric rings around (cx, cy), near 1."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    d = np.hypot(xx - cx, yy - cy)  # (side, side)
    theta = np.arctan2(yy - cy, xx - cx)
    # The angular wobble makes the rings read as brush strokes rather than a target.
    d = d + 0.06 * period * np.sin(5 * theta + phase) + 0.04 * period * np.sin(11 * theta - 2 * phase)
    return 1.0 + 0.09 * np.sin(2 * math.pi * d / period + phase)


def paper(side: int, seed: int = SEED) -> np.ndarray:
    """Return a (side, side, 3) multiplicative paper factor: warm tint times soft grain.

    The same sheet is used for every image, as one would paint a series on one paper stock.
    """
    rng = np.random.default_rng(seed)
    grain = Image.fromarray((rng.random((side, side)) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1.2)
    )
    fibers = Image.fromarray((rng.random((side // 8, side // 8)) * 255).astype(np.uint8)).resize(
        (side, side), Image.BICUBIC
    )
    g = np.asarray(grain, np.float64) / 255 - 0.5  # (side, side), zero-mean-ish
    f = np.asarray(fibers, np.float64) / 255 - 0.5
    tone = 1.0 + 0.10 * g + 0.06 * f
    tint = np.array([1.0, 0.95, 0.85])  # sepia: every colour leans warm
    return tone[..., None] * tint  # (side, side, 3)


def render(scene: Scene, index: int) -> Image.Image:
    """Return the painting of ``scene`` as a SIZE x SIZE RGB image; ``index`` seeds its brushwork."""
    side = SIZE * SCALE
    rng = np.random.default_rng([SEED, index])
    fx, fy = PLACES[scene.place]
    cx, cy = fx * side, fy * side
    s = side * rng.uniform(0.24, 0.3)  # object half-size

    bg_rings = rings(side, cx, cy, period=side * 0.09, phase=rng.uniform(0, 2 * math.pi))[..., None]
    strokes = rings(side, cx, cy, period=side * 0.045, phase=rng.uniform(0, 2 * math.pi))[..., None]  # finer
    canvas = np.asarray(PALETTE[scene.background], np.float64) * bg_rings  # (side, side, 3)
    ink = np.asarray(OUTLINE, np.float64)
    for mask, rgb in SHAPES[scene.obj](cx, cy, s, side, PALETTE[scene.color]):
        # Thick outline: the part dilated by 4 drawn px (2 saved px) each side, in ink, under the fill.
        outline = np.asarray(mask.filter(ImageFilter.MaxFilter(9)), np.float64)[..., None] / 255
        fill = np.asarray(mask, np.float64)[..., None] / 255
        canvas = canvas * (1 - outline) + ink * outline
        canvas = canvas * (1 - fill) + np.asarray(rgb, np.float64) * strokes * fill

    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.LANCZOS)
    out = np.asarray(image, np.float64) * paper(SIZE)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def make(out: Path, count: int = 24) -> list[Path]:
    """Write ``count`` images ``demo_NN.png`` with same-name ``.txt`` captions to ``out``; return the image paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes(count)):
        path = out / f"demo_{i:02d}.png"
        render(scene, i).save(path, optimize=True)
        path.with_suffix(".txt").write_text(scene.caption() + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--count", type=int, default=24, help="number of images (default: %(default)s)")
    args = parser.parse_args()
    paths = make(args.out, args.count)
    print(f"wrote {len(paths)} images and captions to {args.out}")


if __name__ == "__main__":
    main()
