"""Side-by-side samples: the base model and one or more LoRA files, same prompts, same seeds, same initial noise.

Adapters are loaded the way a user loads them, `pipe.load_lora_weights(file)` into a fresh pipeline, so the grid
shows what the exported file does, not what the training process held in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open

from opdiff.settings import Settings, option
from pipelines.encoding import native_resolution
from pipelines.model import load_pipeline
from pipelines.rundir import RunDir

MIN_CELL = 192  # small models' images are upscaled (nearest) to at least this many pixels so the grid is legible
LABEL_HEIGHT = 16
DEFAULT_PROMPTS = ("a painting in opdiff style",)


@dataclass
class SampleConfig(Settings):
    """`opdiff sample`: base vs adapted images on the same prompts, seeds and noise."""

    source: str = option(help="A run folder (uses its base, LoRA and sample settings) or a base model.",
                         group="run", positional=True)
    lora: tuple[Path, ...] = option((), "LoRA files to compare against the base; empty: the run folder's "
                                    "lora.safetensors.", group="basic", label="LoRA files")
    prompt: tuple[str, ...] = option((), "Prompts; empty: the run's sample prompts.", group="basic")
    seed: tuple[int, ...] = option((), "Seeds; empty: the run's sample seeds.", group="basic")
    steps: int | None = option(None, "Denoising steps per image.", group="basic", minimum=1,
                               none_means="the run's sample_steps")
    guidance_scale: float | None = option(None, "Classifier-free guidance scale: how strongly images follow the "
                                          "prompt.", group="basic", minimum=0, none_means="the run's guidance_scale",
                                          label="guidance scale")
    out: Path | None = option(None, "Where to save the grid PNG.", group="basic",
                              none_means="<run folder>/samples.png, or ./samples.png for a base model")
    vae: str | None = option(None, "A VAE to decode with instead of the base model's (folder, file or hub id).",
                             none_means="the run's VAE (the one it trained with), else the base model's",
                             label="VAE")
    device: str | None = option(None, "Torch device to run on, e.g. cuda:1.",
                                none_means="cuda when available, else cpu")


@dataclass
class Comparison:
    """Images of several models on the same prompts and seeds: one column per model, one row per prompt x seed."""

    titles: list[str]
    """Column titles: "base", then one per LoRA (its method and run)."""
    rows: list[tuple[str, list[Image.Image]]] = field(default_factory=list)
    """(label "seed S: prompt", one image per column)."""


def sample(cfg: SampleConfig, progress: Callable[[int, int], None] | None = None) -> Comparison:
    """Render base and every adapter on the same prompts, seeds and initial noise; return the comparison.

    `cfg.source` is a run folder (its base, its `lora.safetensors`, and its sample prompts, seeds, steps and
    resolution as defaults) or a base model (diffusers folder, single file, hub id) compared against `cfg.lora`.
    `progress(done, total)` is called after each image.
    """
    run = RunDir(cfg.source)
    config = run.read_config() if run.is_run() else None
    settings = config["train"] if config else {}
    loras = list(cfg.lora) or ([run.current_lora()] if config else [])
    prompts = list(cfg.prompt or settings.get("sample_prompts") or DEFAULT_PROMPTS)
    seeds = list(cfg.seed or settings.get("sample_seeds") or (0,))
    steps = cfg.steps or settings.get("sample_steps", 20)
    guidance_scale = cfg.guidance_scale if cfg.guidance_scale is not None else settings.get("guidance_scale", 5.0)

    vae = cfg.vae if cfg.vae is not None else settings.get("vae")  # what the run's samples showed while training
    pipe = load_pipeline(config["base"] if config else cfg.source, device=cfg.device, vae=vae)
    size = settings.get("resolution") or native_resolution(pipe)
    names = [f"adapter{i}" for i in range(len(loras))]
    for path, name in zip(loras, names, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    comparison = Comparison(["base"] + [_title(p) for p in loras])
    total = len(prompts) * len(seeds) * (1 + len(names))
    for prompt in prompts:
        for seed in seeds:
            images = []
            for name in [None, *names]:
                images.append(_render(pipe, name, prompt, seed, size, steps, guidance_scale))
                if progress is not None:
                    progress(len(comparison.rows) * (1 + len(names)) + len(images), total)
            comparison.rows.append((f"seed {seed}: {prompt}", images))
    return comparison


def default_grid_path(cfg: SampleConfig) -> Path:
    """Where `opdiff sample` saves the grid: `cfg.out`, else the run folder's samples.png, else ./samples.png."""
    if cfg.out is not None:
        return Path(cfg.out)
    run = RunDir(cfg.source)
    return run.grid if run.is_run() else Path(RunDir.GRID)


def save_grid(comparison: Comparison, path: str | Path) -> Path:
    """Save the comparison as one labelled grid PNG; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(comparison.rows, comparison.titles).save(path)
    return path


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
    """Return one image: a title band (`titles` over the columns), then per row a label band and its images. Text
    too long for its width wraps onto more lines of the band, so no label is cut."""
    cell = max(MIN_CELL, rows[0][1][0].width)
    font = ImageFont.load_default(size=11)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heads = [_wrap(draw, title, font, cell - 8) for title in titles]
    labels = [_wrap(draw, label, font, cell * len(titles) - 8) for label, _ in rows]
    head = LABEL_HEIGHT * max(map(len, heads))
    height = head + sum(LABEL_HEIGHT * len(lines) + cell for lines in labels)
    grid = Image.new("RGB", (cell * len(titles), height), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(heads):
        draw.multiline_text((c * cell + 4, 2), "\n".join(lines), fill="black", font=font, spacing=LABEL_HEIGHT - 11)
    top = head
    for lines, (_, images) in zip(labels, rows, strict=True):
        draw.multiline_text((4, top + 2), "\n".join(lines), fill="black", font=font, spacing=LABEL_HEIGHT - 11)
        top += LABEL_HEIGHT * len(lines)
        for c, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, top))
        top += cell
    return grid


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels, broken at spaces (a word wider than a line, anywhere in it)."""
    lines = [""]
    for word in text.split(" "):
        joined = f"{lines[-1]} {word}" if lines[-1] else word
        if draw.textlength(joined, font=font) <= width:
            lines[-1] = joined
            continue
        lines.append("")
        for char in word:
            if lines[-1] and draw.textlength(lines[-1] + char, font=font) > width:
                lines.append("")
            lines[-1] += char
    return [line for line in lines if line] or [""]


def _title(lora: Path) -> str:
    """Column title of a LoRA file: its method (from the file's metadata) and the run folder's name."""
    with safe_open(str(lora), framework="pt") as f:
        method = (f.metadata() or {}).get("opdiff_method")
    name = lora.parent.name if lora.name == RunDir.LORA else lora.stem
    return f"{method}: {name}" if method else name
