"""Samples while training: the sample prompts on fixed seeds, rendered with the adapter as it is at that step.

They render on the training pipeline with the adapter in memory (`opdiff.materialize`), not from an exported file,
so they cost no export and show exactly the weights being trained. The training run does not notice them: the
global random generators are forked and restored, every module gets its train/eval mode back, and the encoders
return to where training keeps them. The same seeds every time make the grids comparable step to step.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

import opdiff
from pipelines.config import TrainConfig
from pipelines.rundir import RunDir, atomic_write_bytes
from pipelines.sample import grid_image


class Previews:
    """Renders `cfg.sample_prompts` x `cfg.sample_seeds` at the training resolution into `samples/` of the run."""

    def __init__(self, pipe: StableDiffusionXLPipeline, cfg: TrainConfig, run: RunDir,
                 autocast_dtype: torch.dtype | None, device: str) -> None:
        self.pipe, self.run, self.every = pipe, run, cfg.sample_every
        self.prompts, self.seeds = cfg.sample_prompts, cfg.sample_seeds
        self.steps, self.guidance_scale, self.size = cfg.sample_steps, cfg.guidance_scale, cfg.resolution
        self.autocast_dtype, self.device = autocast_dtype, torch.device(device)

    def due(self, step: int, total: int) -> bool:
        """Whether samples are rendered after optimizer step `step` of `total`: every `sample_every` and the last."""
        return step % self.every == 0 or step == total

    @torch.no_grad()
    def render(self, step: int) -> tuple[Path, Image.Image]:
        """Render the grid after step `step` (0: the base, before training); return its path and image."""
        pipe, unet = self.pipe, self.pipe.unet
        modes = [(m, m.training) for m in unet.modules()]
        parked = [m for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2) if m.device != self.device]
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            for module in parked:
                module.to(self.device)
            with torch.random.fork_rng(devices=cuda), opdiff.materialize(unet):
                unet.eval()
                rows = [(f"seed {seed}: {prompt}", [self._image(prompt, seed)])
                        for prompt in self.prompts for seed in self.seeds]
        finally:
            for module, training in modes:
                module.train(training)
            for module in parked:
                module.to("cpu")
            if cuda and parked:
                torch.cuda.empty_cache()
        grid = grid_image(rows, [f"step {step}" if step else "step 0 (base)"])
        path = self.run.sample_grid(step)
        atomic_write_bytes(path, _png_bytes(grid))
        return path, grid

    def _image(self, prompt: str, seed: int) -> Image.Image:
        """One image: the U-Net as in training (autocast), the latent decoded by the float32 VAE."""
        pipe, vae = self.pipe, self.pipe.vae
        generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same start on any device
        autocast = torch.autocast(self.device.type, self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with autocast:
            latents = pipe(prompt, height=self.size, width=self.size, num_inference_steps=self.steps,
                           guidance_scale=self.guidance_scale, generator=generator, output_type="latent").images
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return pipe.image_processor.postprocess(vae.decode(latents).sample, output_type="pil")[0]



def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
