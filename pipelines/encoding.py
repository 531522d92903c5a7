"""Encoding for the U-Net: VAE latents and SDXL text conditioning, and the disk cache that keeps them across runs.

The VAE and the text encoders are frozen, so every image and caption is encoded once (`pipelines.training_data`)
and, with a cache folder, stored keyed by content, model weights and crop region.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from pipelines.data import Dataset, Example, View, center_view, load_view
from pipelines.model import fingerprint

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """A batch after the frozen VAE and text encoders: everything the U-Net sees, one row per image."""

    latents: torch.Tensor  # (N, 4, H/8, W/8), already times the VAE scaling factor
    prompt_embeds: torch.Tensor  # (N, 77, D1 + D2): both text encoders' penultimate states, concatenated
    pooled: torch.Tensor  # (N, P): text_encoder_2's pooled projection
    time_ids: torch.Tensor  # (N, 6): original (h, w), crop (top, left), target (h, w)

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, index: torch.Tensor) -> Encoded:
        """Return the rows at `index`."""
        return Encoded(self.latents[index], self.prompt_embeds[index], self.pooled[index], self.time_ids[index])

    def to(self, device: str | torch.device) -> Encoded:
        """Return the batch on `device`."""
        return Encoded(*(t.to(device) for t in (self.latents, self.prompt_embeds, self.pooled, self.time_ids)))


def native_resolution(pipe: StableDiffusionXLPipeline) -> int:
    """Return the image size the base model was trained at: U-Net sample size x VAE downsampling (1024 for SDXL)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def min_resolution(pipe: StableDiffusionXLPipeline) -> int:
    """Return the smallest image size the base can train at: VAE downsampling x 2 per U-Net down-sampling (one fewer
    than its resolution levels), so that the deepest features are at least 1 x 1 (32 for SDXL: 8 x 2 x 2)."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)


def check_resolution(pipe: StableDiffusionXLPipeline, resolution: int) -> None:
    """Raise ValueError naming the setting when `resolution` is below `min_resolution` of this base."""
    smallest = min_resolution(pipe)
    if resolution < smallest:
        levels = len(pipe.unet.config.down_block_types)
        raise ValueError(f"resolution must be >= {smallest} for this base model, got {resolution} (its VAE divides "
                         f"by {pipe.vae_scale_factor} and its U-Net halves {levels - 1} more times)")


@torch.no_grad()
def encode_image(pipe: StableDiffusionXLPipeline, path: Path, view: View) -> torch.Tensor:
    """Return the VAE latent of `view` of the image at `path`: (4, h/8, w/8) float32 on the CPU.

    The posterior mean (deterministic; SDXL's posterior std is small), shifted and scaled as the U-Net expects.
    """
    vae = pipe.vae
    pixels = load_view(path, view)  # (3, h, w)
    latent = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist.mean  # (1, 4, h/8, w/8)
    shift = vae.config.shift_factor or 0.0
    return ((latent[0] - shift) * vae.config.scaling_factor).float().cpu()


@torch.no_grad()
def encode_caption(pipe: StableDiffusionXLPipeline, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (prompt embeddings (77, D1 + D2), pooled embedding (P,)) of one caption, on the CPU."""
    embeds, _, pooled, _ = pipe.encode_prompt(caption, device=pipe.text_encoder.device,
                                              do_classifier_free_guidance=False)
    return embeds[0].cpu(), pooled[0].cpu()


def encode_batch(pipe: StableDiffusionXLPipeline, examples: list[Example], views: list[View],
                 captions: list[str] | None = None) -> Encoded:
    """Return the U-Net inputs of `views` of `examples` (one view per example), encoded now: the uncached path.

    `captions` replace the examples' own (e.g. augmented ones). Images are encoded one at a time, as the cache
    does, so both paths give the same numbers.
    """
    latents = [encode_image(pipe, ex.path, v) for ex, v in zip(examples, views, strict=True)]
    texts = [encode_caption(pipe, c) for c in (captions or [ex.caption for ex in examples])]
    time_ids = torch.tensor([v.time_ids() for v in views], dtype=torch.float32)  # (N, 6)
    return Encoded(torch.stack(latents), torch.stack([e for e, _ in texts]), torch.stack([p for _, p in texts]),
                   time_ids)


def encode_dataset(pipe: StableDiffusionXLPipeline, dataset: Dataset, resolution: int) -> Encoded:
    """Return every example encoded as a centered square crop of `resolution` px: fixed inputs for a whole set."""
    views = [center_view(ex.size, (resolution, resolution)) for ex in dataset.examples]
    return encode_batch(pipe, dataset.examples, views)


def text_identity(pipe: StableDiffusionXLPipeline) -> str:
    tokenizers = ":".join(f"{type(t).__name__}/{len(t)}/{t.model_max_length}"
                          for t in (pipe.tokenizer, pipe.tokenizer_2))
    return fingerprint(pipe.text_encoder, pipe.text_encoder_2) + tokenizers


def cache_entry(folder: Path | None, *key: object) -> Path | None:
    """The cache file for `key` (its parts' sha256) in `folder`; None without a folder."""
    if folder is None:
        return None
    return folder / f"{hashlib.sha256('|'.join(map(str, key)).encode()).hexdigest()}.safetensors"


def cache_read(path: Path | None) -> dict[str, torch.Tensor] | None:
    if path is None or not path.is_file():
        return None
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, never fatal
        log.warning("ignoring unreadable cache entry %s (%s: %s)", path, type(e).__name__, e)
        return None


def cache_write(path: Path | None, tensors: dict[str, torch.Tensor]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two runs may share a cache folder
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:  # also when interrupted: no temporary file is left behind
        tmp.unlink(missing_ok=True)
