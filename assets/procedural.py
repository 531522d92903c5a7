"""The procedural image world the bundled tiny model is pretrained on: plain flat shapes with captions that name them.

Every image is one object (the twelve of the demo set: circle, square, ..., mountain) in a bright, saturated
colour on a plain, striped, dotted or checkered background, at one of the demo set's five places, e.g.
"a red circle on the left on a blue striped background". The object outlines come from
``make_demo_data.py`` (imported, not changed). The diffusion U-Net sees only this plain world: no outlines,
no brush strokes, no paper, no muted palette, so that the demo set's style is new to it and a LoRA has
something to learn.

A ``Look`` adds such rendering variations (outlines of some colour, ring or line brush strokes, muted
colours, paper), named in the caption ("..., with dark outlines, on paper"). Looks are for the two models
that must handle images of any style: the VAE, a general image codec (SDXL's was trained on broad photos,
not on its U-Net's data), and the tiny CLIP behind the demo CMMD, which can only tell styles apart if it has
seen some (the real CMMD's CLIP was trained on the web).

Each image is a pure function of ``(seed, index, looks)``, so a world of N images is the first N of any
larger one and can be rebuilt, in part or whole, anywhere.

Usage: ``python assets/procedural.py [--out DIR] [--count 16] [--looks]`` writes a sample as captioned PNGs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ASSETS = Path(__file__).resolve().parent


def _load_demo_script():
    # assets/ holds scripts, not a package; load the demo-set script by path (once per process).
    name = "assets_make_demo_data"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ASSETS / "make_demo_data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


demo = _load_demo_script()

SIZE = 64  # saved side, px: the bundled model's native resolution
SCALE = 2  # drawn at SIZE * SCALE and downsampled, for smooth edges
SEED = 0

# Bright, saturated colours under the demo set's colour names (and two more); the demo palette is muted,
# so a LoRA trained on it has the palette to learn as part of its style.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 40),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 0),
    "pink": (255, 105, 180),
    "green": (30, 180, 60),
    "teal": (0, 170, 170),
    "blue": (30, 80, 230),
    "purple": (150, 50, 210),
    "cream": (255, 245, 205),
    "white": (250, 250, 250),
    "gray": (140, 140, 140),
}
DETAIL = (40, 40, 40)  # a door, an eye: part of the object, drawn flat (not an outline)
TRUNK = (130, 80, 40)
TEXTURES = ("plain", "striped", "dotted", "checkered")
TEXTURE_WEIGHTS = (0.55, 0.15, 0.15, 0.15)  # plain backgrounds most often, as in the demo prompts
OBJECTS: tuple[str, ...] = demo.OBJECTS
PLACES: dict[str, tuple[float, float]] = demo.PLACES
PREFIXES = ("", "", "", "a painting of ", "a picture of ", "a drawing of ")  # half the captions have none
PERIOD = 16  # background pattern period in saved px: 4 per image, coarse enough for the 8 x 8 latent grid

# The demo shapes paint details in demo palette colours (a roof in "red", a flower centre in "yellow") and in
# its ink and trunk browns; each is repainted in the world colour of the same name.
_BODY_SENTINEL = (1, 2, 3)  # stands for a body colour the demo palette has no entry for
_REPAINT = {rgb: COLORS[name] for name, rgb in demo.PALETTE.items()} | {demo.OUTLINE: DETAIL, demo.TRUNK: TRUNK}


@dataclass(frozen=True)
class Scene:
    """What one image shows and how its caption is worded."""

    obj: str
    color: str
    background: str
    texture: str
    place: str
    name_place: bool  # whether the caption names the place
    prefix: str

    def caption(self) -> str:
        """Return the caption, e.g. 'a red circle on the left on a blue striped background'."""
        place = f" {self.place}" if self.name_place else ""
        texture = "" if self.texture == "plain" else f" {self.texture}"
        return (
            f"{self.prefix}{demo._article(self.color)} {self.color} {self.obj}{place} "
            f"on {demo._article(self.background)} {self.background}{texture} background"
        )


def random_scene(rng: np.random.Generator) -> Scene:
    """Return a scene drawn from ``rng``: object and background colours always differ."""
    colors = list(COLORS)
    color = colors[rng.integers(len(colors))]
    background = colors[rng.choice([j for j, c in enumerate(colors) if c != color])]
    return Scene(
        obj=OBJECTS[rng.integers(len(OBJECTS))],
        color=color,
        background=background,
        texture=TEXTURES[rng.choice(len(TEXTURES), p=TEXTURE_WEIGHTS)],
        place=list(PLACES)[rng.integers(len(PLACES))],
        name_place=bool(rng.random() < 0.5),
        prefix=PREFIXES[rng.integers(len(PREFIXES))],
    )


def background(color: tuple[int, int, int], texture: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """Return a (side, side, 3) float background: the colour, and where textured a second tone of it."""
    base = np.asarray(color, np.float64)
    # The second tone is lighter, or darker for colours already near white, so every pattern shows.
    other = base * 0.78 if base.mean() > 200 else base * 0.6 + 255 * 0.4
    period = PERIOD * side / SIZE
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) + rng.uniform(0, period, size=2)[:, None, None]
    if texture == "plain":
        pattern = np.zeros((side, side))
    elif texture == "striped":
        pattern = ((xx + yy) % period) < period / 2  # diagonal stripes
    elif texture == "dotted":
        cell = period / 2
        pattern = np.hypot((xx % period) - cell, (yy % period) - cell) < 0.3 * period
    elif texture == "checkered":
        pattern = ((xx // (period / 2)) + (yy // (period / 2))) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")
    pattern = np.asarray(pattern, np.float64)[..., None]  # (side, side, 1)
    return base * (1 - pattern) + other * pattern


@dataclass(frozen=True)
class Look:
    """How a scene is painted beyond flat colour; the default is the plain world's look."""

    outline: str | None = None  # outline colour word ("dark", "white", "colored"), or None
    strokes: str | None = None  # "ring" (concentric, around the object) or "line" brush strokes, or None
    muted: bool = False  # colours pulled towards grey and darkened
    paper: bool = False  # a warm tint and grain over the whole image

    def phrase(self) -> str:
        """Return the caption suffix naming the look, e.g. ', with dark outlines, on paper' ('' when plain)."""
        parts = [f"with {self.outline} outlines"] if self.outline else []
        parts += [f"with {self.strokes} strokes"] if self.strokes else []
        parts += ["in muted colours"] if self.muted else []
        parts += ["on paper"] if self.paper else []
        return "".join(f", {p}" for p in parts)


OUTLINES = ("dark", "white", "colored")
STROKES = ("ring", "line")
LOOK_P = 0.3  # chance of each look feature: about a quarter of looked images stay plain


def random_look(rng: np.random.Generator) -> Look:
    """Return a look whose features are each present with probability LOOK_P."""
    on = rng.random(4) < LOOK_P
    return Look(
        outline=OUTLINES[rng.integers(len(OUTLINES))] if on[0] else None,
        strokes=STROKES[rng.integers(len(STROKES))] if on[1] else None,
        muted=bool(on[2]),
        paper=bool(on[3]),
    )


def _outline_rgb(word: str, rng: np.random.Generator) -> np.ndarray:
    if word == "dark":
        return rng.uniform(10, 70, 3)  # near-black of any hue
    if word == "white":
        return rng.uniform(225, 255, 3)
    return np.asarray(list(COLORS.values())[rng.integers(len(COLORS))], np.float64)


def _strokes(kind: str, side: int, cx: float, cy: float, rng: np.random.Generator) -> np.ndarray:
    """Return a (side, side, 1) brightness factor near 1: concentric rings around (cx, cy) or straight lines."""
    period = side * rng.uniform(0.035, 0.1)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "ring":
        factor = demo.rings(side, cx, cy, period, phase)
    else:
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
        d = xx * np.cos(angle) + yy * np.sin(angle)
        factor = 1.0 + 0.09 * np.sin(2 * np.pi * d / period + phase)
    return factor[..., None]


def _mute(rgb: np.ndarray, amount: float) -> np.ndarray:
    grey = rgb.mean(axis=-1, keepdims=True)
    return (rgb * (1 - amount) + grey * amount) * (1 - 0.3 * amount)


def render(scene: Scene, rng: np.random.Generator, look: Look = Look()) -> Image.Image:
    """Return ``scene`` as a SIZE x SIZE RGB image painted with ``look``.

    ``rng`` draws the exact place, size, pattern offset and the look's free parameters.
    """
    side = SIZE * SCALE
    fx, fy = PLACES[scene.place]
    cx, cy = (np.array([fx, fy]) + rng.normal(0, 0.025, size=2)) * side
    s = side * rng.uniform(0.2, 0.3)  # object half-size, about the demo set's 0.24-0.3
    ones = np.ones((side, side, 1))
    bg_strokes = _strokes(look.strokes, side, cx, cy, rng) if look.strokes else ones
    fill_strokes = _strokes(look.strokes, side, cx, cy, rng) if look.strokes else ones
    canvas = background(COLORS[scene.background], scene.texture, side, rng) * bg_strokes  # (side, side, 3)
    ink = _outline_rgb(look.outline, rng) if look.outline else None
    width = int(rng.integers(1, 4))  # outline width in drawn px each side: 0.5 to 1.5 saved px
    body = demo.PALETTE.get(scene.color, _BODY_SENTINEL)  # the demo shape picks its details by colour name
    for mask, rgb in demo.SHAPES[scene.obj](cx, cy, s, side, body):
        if ink is not None:
            edge = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * width + 1)), np.float64)[..., None] / 255
            canvas = canvas * (1 - edge) + ink * edge
        fill = np.asarray(mask, np.float64)[..., None] / 255  # (side, side, 1)
        paint = np.asarray(COLORS[scene.color] if rgb == body else _REPAINT[rgb], np.float64)
        canvas = canvas * (1 - fill) + paint * fill_strokes * fill
    if look.muted:
        canvas = _mute(canvas, rng.uniform(0.25, 0.5))
    image = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    if look.paper:
        sheet = demo.paper(SIZE, seed=int(rng.integers(2**31)))  # (SIZE, SIZE, 3)
        image = Image.fromarray(np.clip(np.round(np.asarray(image, np.float64) * sheet), 0, 255).astype(np.uint8))
    return image


def example(index: int, seed: int = SEED, looks: bool = False) -> tuple[Image.Image, str]:
    """Return image ``index`` of the world drawn from ``seed`` and its caption; ``looks`` adds random looks."""
    rng = np.random.default_rng([seed, index, int(looks)])
    scene = random_scene(rng)
    look = random_look(rng) if looks else Look()
    return render(scene, rng, look), scene.caption() + look.phrase()


def world(count: int, seed: int = SEED, start: int = 0, looks: bool = False) -> tuple[np.ndarray, list[str]]:
    """Return images ``start .. start + count - 1`` as uint8 (count, SIZE, SIZE, 3) and their captions."""
    images = np.empty((count, SIZE, SIZE, 3), np.uint8)
    captions = []
    for i in range(count):
        image, caption = example(start + i, seed, looks)
        images[i] = np.asarray(image)
        captions.append(caption)
    return images, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("world-sample"), help="output folder (default: %(default)s)")
    parser.add_argument("--count", type=int, default=16, help="number of images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="world seed (default: %(default)s)")
    parser.add_argument("--looks", action="store_true", help="random looks (the VAE's and CLIP's world)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        image, caption = example(i, args.seed, args.looks)
        image.save(args.out / f"world_{i:04d}.png")
        (args.out / f"world_{i:04d}.txt").write_text(caption + "\n", encoding="utf-8")
    print(f"wrote {args.count} images and captions to {args.out}")


if __name__ == "__main__":
    main()
