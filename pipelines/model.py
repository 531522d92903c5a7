"""Load an SDXL base model from whatever the user has: a diffusers folder, one `.safetensors` file, or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline


def default_device() -> str:
    """Return `cuda` when a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(
    base: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None
) -> StableDiffusionXLPipeline:
    """Return the SDXL pipeline at `base` in `dtype` on `device` (default: cpu, or cuda when available).

    Tries, in order: a diffusers folder (has `model_index.json`), a single checkpoint file (`from_single_file`),
    a hub id (`from_pretrained`, which respects HF_HUB_OFFLINE). Raises ValueError naming every attempt and
    its error when none loads.
    """
    base_str = str(base)
    path = Path(base_str).expanduser()
    if path.is_dir():
        attempts = [("diffusers folder", lambda: StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype))]
    elif path.is_file():
        attempts = [
            ("single-file checkpoint", lambda: StableDiffusionXLPipeline.from_single_file(str(path), dtype=dtype))
        ]
    else:
        attempts = [("hub id", lambda: StableDiffusionXLPipeline.from_pretrained(base_str, dtype=dtype))]
    errors = []
    for what, load in attempts:
        try:
            pipe = load()
        except Exception as e:  # noqa: BLE001 - every loader failure is reported below, by name
            errors.append(f"  as a {what}: {type(e).__name__}: {e}")
            continue
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device or default_device())
    hint = "" if path.exists() else " (no such file or folder here either)"
    raise ValueError(f"could not load an SDXL base model from {base_str!r}{hint}; tried:\n" + "\n".join(errors))
