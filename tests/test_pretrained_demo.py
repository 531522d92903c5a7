"""The bundled model is pretrained on the procedural world: it draws what prompts name, and the tiny CLIP sees style."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from metrics import ClipEmbedder

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_CLIP = ASSETS / "tiny-clip"


def _load_script(name: str):
    # assets/ holds scripts, not a package; load them by path.
    module_name = f"assets_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ASSETS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[module_name]


procedural = _load_script("procedural")
COLORS = {name: np.asarray(rgb) / 255 for name, rgb in procedural.COLORS.items()}


@pytest.fixture(scope="module")
def pipe(bundled_model) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(bundled_model, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mean_colours(pipe: StableDiffusionXLPipeline, prompts: list[str], seeds: int = 2) -> np.ndarray:
    """Mean RGB in [0, 1] of `seeds` generated 64 px images per prompt: (len(prompts), 3)."""
    torch.set_num_threads(1)
    generators = [torch.Generator().manual_seed(s) for _ in prompts for s in range(seeds)]
    images = pipe([p for p in prompts for _ in range(seeds)], height=64, width=64, num_inference_steps=12,
                  guidance_scale=5.0, generator=generators, output_type="np").images  # (P * S, 64, 64, 3)
    return images.reshape(len(prompts), seeds, -1, 3).mean(axis=(1, 2))


def test_base_draws_the_colours_a_prompt_names(pipe, single_thread):
    red_on_blue, green_on_yellow = _mean_colours(
        pipe, ["a red circle on a blue background", "a green square on a yellow background"]
    )
    # Mostly background: blue (30, 80, 230) against yellow (255, 225, 0).
    assert red_on_blue[2] - green_on_yellow[2] > 0.3
    assert green_on_yellow[0] - red_on_blue[0] > 0.3
    assert green_on_yellow[1] - red_on_blue[1] > 0.2


def test_base_paints_the_named_background(pipe, single_thread):
    names = ["red", "green", "blue", "yellow", "purple", "white"]
    means = _mean_colours(pipe, [f"a gray circle on a {name} background" for name in names])  # (6, 3)
    palette = np.stack([COLORS[n] for n in names])  # (6, 3)
    nearest = np.linalg.norm(means[:, None] - palette[None], axis=-1).argmin(axis=1)
    assert [names[i] for i in nearest] == names


def test_world_is_seeded_and_prefix_stable():
    images, captions = procedural.world(3, seed=5)
    more, more_captions = procedural.world(5, seed=5)
    np.testing.assert_array_equal(images, more[:3])
    assert captions == more_captions[:3]
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert procedural.world(3, seed=6)[1] != captions


def test_plain_world_is_flat_and_named():
    # The U-Net's world: a plain background is exactly the named colour; no look words in any caption.
    rng = np.random.default_rng(0)
    scene = procedural.Scene("circle", "red", "blue", "plain", "in the center", True, "")
    image = np.asarray(procedural.render(scene, rng))
    assert scene.caption() == "a red circle in the center on a blue background"
    assert tuple(image[0, 0]) == procedural.COLORS["blue"]
    assert tuple(image[32, 32]) == procedural.COLORS["red"]
    _, captions = procedural.world(64)
    assert not any(word in c for c in captions for word in ("outline", "strokes", "muted", "paper"))


@pytest.fixture(scope="module")
def tiny_clip() -> ClipEmbedder:
    return ClipEmbedder.load(f"local-dir:{TINY_CLIP}", checkpoint=TINY_CLIP / "open_clip_model.safetensors")


def test_tiny_clip_folder_is_a_small_open_clip_model():
    assert sum(p.stat().st_size for p in TINY_CLIP.iterdir()) < 2_000_000
    model = open_clip.create_model(f"local-dir:{TINY_CLIP}")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_tiny_clip_embeds_style_images_together(tiny_clip, bundled_data, single_thread):
    style = [Image.open(p).convert("RGB") for p in sorted(bundled_data.glob("*.png"))[:12]]
    images, _ = procedural.world(12, seed=1)
    plain = [Image.fromarray(im) for im in images]
    s, p = tiny_clip.embed(style, progress=False), tiny_clip.embed(plain, progress=False)  # (12, D) each, unit norm
    within = (s @ s.T)[~np.eye(len(s), dtype=bool)].mean()
    across = (s @ p.T).mean()
    assert within > across + 0.1
