"""Load an SDXL base model from whatever the user has: a diffusers folder, one `.safetensors` file, or a hub id.

Single files are read offline with the SDXL configs shipped in assets/ (see `pipelines.single_file`).

The VAE is always float32 (SDXL's VAE overflows in float16) and may come from elsewhere (`vae`), e.g. an
fp16-safe SDXL VAE. `fingerprint` identifies a model by its weights, for the latent and text caches.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from torch import nn

from pipelines import single_file

FINGERPRINT_VALUES = 1024  # values sampled from each tensor: a fine-tune changes nearly every tensor


def default_device() -> str:
    """Return `cuda` when a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(
    base: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    vae: str | Path | None = None,
) -> StableDiffusionXLPipeline:
    """Return the SDXL pipeline at `base`, U-Net and text encoders in `dtype`, VAE in float32, on `device`.

    `base` is tried as: a diffusers folder (has `model_index.json`), a single `.safetensors` checkpoint in SDXL's
    original layout (`pipelines.single_file`: offline, with the shipped SDXL configs), a hub id (`from_pretrained`,
    which respects HF_HUB_OFFLINE). `vae` replaces the base's VAE (see `load_vae`). `device` defaults to cpu, or
    cuda when available. Raises ValueError naming every attempt and its error when none loads (for an
    unsupported single file: what it is instead).
    """
    base_str = str(base)
    path = Path(base_str).expanduser()
    # Per-component dtypes where diffusers supports them: a 16-bit base never holds a float32 copy in memory.
    dtypes = {"default": dtype, "vae": torch.float32}
    if path.is_dir():
        kwargs = {} if vae is None else {"vae": load_vae(vae, config_from=path)}
        attempts = [("diffusers folder",
                     lambda: StableDiffusionXLPipeline.from_pretrained(path, dtype=dtypes, **kwargs))]
    elif path.is_file():
        attempts = [("single-file checkpoint", lambda: _from_single_file(path, vae))]
    else:
        kwargs = {} if vae is None else {"vae": load_vae(vae)}
        attempts = [("hub id", lambda: StableDiffusionXLPipeline.from_pretrained(base_str, dtype=dtypes, **kwargs))]
    pipe = _first_that_loads(base_str, attempts, path.exists())
    for module, wanted in ((pipe.unet, dtype), (pipe.text_encoder, dtype), (pipe.text_encoder_2, dtype),
                           (pipe.vae, torch.float32)):
        if module.dtype != wanted:  # a single file, or a passed-in VAE of another dtype
            module.to(wanted)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


def _from_single_file(path: Path, vae: str | Path | None) -> StableDiffusionXLPipeline:
    """A single-file base, its architecture checked before anything loads; a single-file `vae` takes that
    architecture's VAE config. float32: from_single_file takes one dtype, and the VAE keeps its full precision."""
    _, configs = single_file.architecture(path)
    kwargs = {} if vae is None else {"vae": load_vae(vae, config_from=configs)}
    return single_file.load(path, torch.float32, **kwargs)


def load_vae(source: str | Path, config_from: Path | None = None) -> AutoencoderKL:
    """Return the float32 VAE at `source`: a diffusers VAE folder (or a pipeline folder with `vae/`), a
    single-file VAE checkpoint, or a hub id. A single file is converted with the VAE config of `config_from`
    (a local diffusers pipeline folder), by default the shipped SDXL one, so it loads offline. Raises ValueError
    naming every attempt.
    """
    source_str = str(source)
    path = Path(source_str).expanduser()
    fp32 = {"dtype": torch.float32}
    if path.is_dir():
        sub = {} if (path / "config.json").is_file() else {"subfolder": "vae"}
        attempts = [("diffusers VAE folder", lambda: AutoencoderKL.from_pretrained(path, **sub, **fp32))]
    elif path.is_file():
        config = {"config": str(config_from or single_file.ARCHITECTURES["SDXL base 1.0"]), "subfolder": "vae"}
        attempts = [("single-file VAE", lambda: AutoencoderKL.from_single_file(str(path), **config, **fp32))]
    else:
        attempts = [
            ("hub id", lambda: AutoencoderKL.from_pretrained(source_str, **fp32)),
            ("hub id with vae/", lambda: AutoencoderKL.from_pretrained(source_str, subfolder="vae", **fp32)),
        ]
    return _first_that_loads(source_str, attempts, path.exists(), what="a VAE")


def _first_that_loads(source: str, attempts: list[tuple[str, Callable]], exists: bool,
                      what: str = "an SDXL base model"):
    errors = []
    for kind, load in attempts:
        try:
            return load()
        except Exception as e:  # noqa: BLE001 - every loader failure is reported below, by name
            errors.append(f"  as a {kind}: {type(e).__name__}: {e}")
    hints = []
    if not exists:
        hints.append("no such file or folder here either")
        if _offline():
            hints.append("HF_HUB_OFFLINE is set, so a hub id loads only from the local Hugging Face cache: "
                         f"download it once online (`hf download {source}`) or pass a local folder")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ValueError(f"could not load {what} from {source!r}{hint}; tried:\n" + "\n".join(errors))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fingerprint(*modules: nn.Module) -> str:
    """Return a hex digest identifying the weights of `modules` (independent of where they were loaded from).

    Hashes every tensor's name, shape, dtype and `FINGERPRINT_VALUES` evenly spaced values: cheap even for
    SDXL's 800M text-encoder parameters, and different for any fine-tune, another VAE, or another dtype.
    """
    digest = hashlib.sha256()
    for module in modules:
        digest.update(type(module).__name__.encode())
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // FINGERPRINT_VALUES)].contiguous().cpu()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
