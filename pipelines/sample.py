"""Side-by-side samples: the base model and one or more LoRA files, same prompts, same seeds, same initial noise.

Adapters are loaded the way a user loads them, `pipe.load_lora_weights(file)` into a fresh pipeline, so the grid
shows what the exported file does, not what the training process held in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image, ImageDraw, ImageFont

from pipelines.export import CONFIG_FILE, LORA_FILE
from pipelines.model import load_pipeline
from pipelines.train import native_resolution

GRID_FILE = "samples.png"
MIN_CELL = 192  # small models' images are upscaled (nearest) to at least this many pixels so the grid is legible
LABEL_HEIGHT = 16
DEFAULT_PROMPTS = ("a painting in opdiff style",)


def sample(
    source: str | Path,
    prompts: list[str] | tuple[str, ...] | None = None,
    seeds: list[int] | tuple[int, ...] | None = None,
    out_file: str | Path | None = None,
    loras: list[str | Path] | tuple[str | Path, ...] = (),
    steps: int | None = None,
    guidance_scale: float | None = None,
    device: str | None = None,
    vae: str | Path | None = None,
) -> Path:
    """Render a grid (rows = prompt x seed, columns = base | each adapter) and return the PNG's path.

    `source` is a run folder (its base, VAE, `lora.safetensors`, and its sample prompts, seeds, steps and
    resolution as defaults) or a base model (diffusers folder, single file, hub id) compared against `loras`.
    `vae` replaces the base's VAE (default: the run's, if it trained with one).
    """
    run = _run_config(Path(source))
    settings = run["train"] if run else {}
    base = run["base"] if run else str(source)
    vae = vae if vae is not None else settings.get("vae")  # the images the run's samples showed while training
    loras = [Path(p) for p in loras] or ([Path(source) / LORA_FILE] if run else [])
    prompts = list(prompts or settings.get("sample_prompts") or DEFAULT_PROMPTS)
    seeds = list(seeds if seeds is not None else settings.get("sample_seeds", (0,)))
    steps = steps or settings.get("sample_steps", 20)
    guidance_scale = guidance_scale if guidance_scale is not None else settings.get("guidance_scale", 5.0)
    if out_file is None:
        out_file = Path(source) / GRID_FILE if run else Path(GRID_FILE)

    pipe = load_pipeline(base, device=device, vae=vae)
    size = settings.get("resolution") or native_resolution(pipe)
    names = [f"adapter{i}" for i in range(len(loras))]
    for path, name in zip(loras, names, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    titles = ["base"] + [_title(p) for p in loras]

    rows = []
    for prompt in prompts:
        for seed in seeds:
            images = [_render(pipe, None, prompt, seed, size, steps, guidance_scale)]
            images += [_render(pipe, name, prompt, seed, size, steps, guidance_scale) for name in names]
            rows.append((f"seed {seed}: {prompt}", images))
    grid = grid_image(rows, titles)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_file)
    return out_file


def _render(pipe: StableDiffusionXLPipeline, adapter: str | None, prompt: str, seed: int, size: int, steps: int,
            guidance_scale: float) -> Image.Image:
    """One image with `adapter` active (None: the base); the seed alone fixes the initial noise."""
    if adapter is None:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters(adapter)
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: equal images on any device for a seed
    return pipe(
        prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator
    ).images[0]


def grid_image(rows: list[tuple[str, list[Image.Image]]], titles: list[str]) -> Image.Image:
    """Return one image: a title strip (`titles` over the columns), then per row a label strip and its images."""
    cell = max(MIN_CELL, rows[0][1][0].width)
    font = ImageFont.load_default(size=11)
    grid = Image.new("RGB", (cell * len(titles), LABEL_HEIGHT + len(rows) * (LABEL_HEIGHT + cell)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        draw.text((c * cell + 4, 2), _fit(draw, title, font, cell - 8), fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        top = LABEL_HEIGHT + r * (LABEL_HEIGHT + cell)
        draw.text((4, top + 2), _fit(draw, label, font, grid.width - 8), fill="black", font=font)
        for c, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, top + LABEL_HEIGHT))
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _title(lora: Path) -> str:
    """Column title of a LoRA file: its method (from the file's metadata) and the run folder's name."""
    from safetensors import safe_open

    with safe_open(str(lora), framework="pt") as f:
        method = (f.metadata() or {}).get("opdiff_method", "lora")
    return f"{method}: {lora.parent.name if lora.name == LORA_FILE else lora.stem}"


def _run_config(path: Path) -> dict | None:
    """The run's config.json if `path` is a run folder, else None."""
    config = path / CONFIG_FILE
    return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
