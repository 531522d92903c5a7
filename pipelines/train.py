"""Train an opdiff adapter on an SDXL U-Net: cache latents and prompt embeddings once, then a plain DDPM loop.

Loss (epsilon prediction, as SDXL was trained):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
L = || eps_theta(x_t, t, text) - eps ||^2, with x_0 the VAE latent of a training image.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from tqdm.auto import tqdm

import opdiff
from pipelines.config import TrainConfig
from pipelines.data import Dataset, load_image, scan_dataset
from pipelines.export import CONFIG_FILE, LORA_FILE, TRAINING_FILE, atomic_save, export
from pipelines.model import default_device, load_pipeline

log = logging.getLogger(__name__)

LOSSES_FILE = "losses.csv"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Encoded:
    """A dataset after the frozen VAE and text encoders: everything the U-Net sees, one row per image."""

    latents: torch.Tensor  # (N, 4, H/8, W/8), already times the VAE scaling factor
    prompt_embeds: torch.Tensor  # (N, 77, D1 + D2): both text encoders' penultimate states, concatenated
    pooled: torch.Tensor  # (N, P): text_encoder_2's pooled projection
    time_ids: torch.Tensor  # (N, 6): original (h, w), crop (top, left), target (h, w)

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, index: torch.Tensor) -> Encoded:
        """Return the rows at `index`."""
        return Encoded(self.latents[index], self.prompt_embeds[index], self.pooled[index], self.time_ids[index])


def native_resolution(pipe: StableDiffusionXLPipeline) -> int:
    """Return the image size the base model was trained at: U-Net sample size x VAE downsampling (1024 for SDXL)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def encode_dataset(pipe: StableDiffusionXLPipeline, dataset: Dataset, resolution: int) -> Encoded:
    """Return every image's VAE latent and every caption's SDXL text conditioning, computed once.

    Latents are the posterior mean (deterministic; SDXL's posterior std is small) times `scaling_factor`.
    """
    device, vae = pipe.unet.device, pipe.vae
    rows = []
    for ex in dataset.examples:
        pixels, original, crop = load_image(ex.path, resolution)  # (3, R, R)
        latent = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(ex.caption, device=device, do_classifier_free_guidance=False)
        time_ids = torch.tensor([[*original, *crop, resolution, resolution]], dtype=embeds.dtype, device=device)
        rows.append((latent, embeds, pooled, time_ids))
    return Encoded(*(torch.cat(col) for col in zip(*rows, strict=True)))


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    batch: Encoded,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Return the mean squared error between the U-Net's prediction and its target for one batch (scalar)."""
    noisy = noise_scheduler.add_noise(batch.latents, noise, timesteps)  # (B, 4, h, w)
    device_type = batch.latents.device.type
    with torch.autocast(device_type, autocast_dtype) if autocast_dtype else nullcontext():
        pred = unet(
            noisy,
            timesteps,
            encoder_hidden_states=batch.prompt_embeds,
            added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids},
        ).sample  # (B, 4, h, w)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(batch.latents, noise, timesteps)
    else:
        raise ValueError(f"cannot train a base model with prediction_type={kind!r}")
    return F.mse_loss(pred.float(), target.float())


def training_step(
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_scheduler: DDPMScheduler,
    batch: Encoded,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    step: int,
    autocast_dtype: torch.dtype | None = None,
    eval_loss: Callable[[], float] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, list[dict]]:
    """One optimizer step on one batch (`step` is 1-based); return (loss, matrices the method selected now).

    The adapter tensors are generated once for the step (`opdiff.materialize`). LoRA-Over MPOP/MPOR then run
    their selection round if one is due; MPOP scores with `eval_loss` (lora-over.txt Eq. 7). `scaler` scales
    the loss so float16 activation gradients do not underflow (fp16 mixed precision only).
    """
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    with opdiff.materialize(unet):
        loss = diffusion_loss(unet, noise_scheduler, batch, noise, timesteps, autocast_dtype)
        scaler.scale(loss).backward()
    selector = opdiff.selector(unet)
    if selector is not None:
        scaler.unscale_(optimizer)
        selector.observe(unet)  # MPOR's Eq. 8 needs this step's (unscaled) gradients
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    chosen = selector.step(unet, step, optimizer, eval_loss) if selector is not None else []
    return loss.item(), chosen


def batch_order(n: int, batch_size: int, total: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield `total` index batches: epochs of a seeded shuffle, the last batch of an epoch possibly smaller."""
    step = 0
    while True:
        for chunk in torch.randperm(n, generator=generator).split(batch_size):
            if step == total:
                return
            step += 1
            yield chunk


def train(
    cfg: TrainConfig,
    on_event: Callable[[dict], None] | None = None,
    pipe: StableDiffusionXLPipeline | None = None,
) -> Path:
    """Train the adapter `cfg` describes; return the run folder.

    The folder gets `config.json` (resolved settings, adapter, base, dataset hash), `losses.csv`,
    `adapter_training.safetensors` (uncollapsed trainable state, every `checkpoint_every` steps and at the end)
    and `lora.safetensors` (the collapsed LoRA). `on_event` receives {step, total, loss, it_s, eta_s} after each
    step. A given `pipe` is trained in place (its U-Net ends up carrying the collapsed adapter).
    """
    dataset = scan_dataset(cfg.data)  # a bad dataset fails here, before any model loads
    log.info("dataset %s: %d images, %d skipped", cfg.data, len(dataset), len(dataset.skipped))
    device = cfg.device or default_device()
    pipe = pipe if pipe is not None else load_pipeline(cfg.base, device=device)
    cfg = replace(
        cfg,
        output_dir=_run_dir(cfg),
        resolution=cfg.resolution or native_resolution(pipe),
        device=device,
        sample_prompts=cfg.sample_prompts or tuple(ex.caption for ex in dataset.examples[:2]),
    )
    run_dir = cfg.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = encode_dataset(pipe.to(device), dataset, cfg.resolution)
    for frozen in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        frozen.to("cpu")  # not needed again while training; frees accelerator memory

    unet = pipe.unet
    torch.manual_seed(cfg.seed)  # adapter init (PEFT's kaiming A, OP's MLPs) draws from the global generator
    opdiff.inject(unet, cfg.adapter_config())
    unet.train()
    optimizer = torch.optim.AdamW(opdiff.param_groups(unet, cfg.lr), weight_decay=cfg.weight_decay)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    autocast_dtype = AUTOCAST_DTYPES.get(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=autocast_dtype is torch.float16)
    generator = torch.Generator().manual_seed(cfg.seed)  # data order, noise and timesteps; CPU so runs match anywhere
    eval_loss = _selection_loss(unet, noise_scheduler, cache, cfg) if opdiff.selector(unet) is not None else None
    total = cfg.max_steps or cfg.epochs * math.ceil(len(cache) / cfg.batch_size)
    run_config = _resolved(cfg, dataset)
    (run_dir / CONFIG_FILE).write_text(json.dumps(run_config, indent=2), encoding="utf-8")

    losses, selections, start = [], [], time.perf_counter()
    progress = tqdm(total=total, desc=f"train {cfg.method}", unit="step")
    for step, index in enumerate(batch_order(len(cache), cfg.batch_size, total, generator), start=1):
        batch = cache.batch(index)
        noise = torch.randn(batch.latents.shape, generator=generator).to(device)  # (B, 4, h, w)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        loss, chosen = training_step(
            unet, optimizer, noise_scheduler, batch, noise, timesteps.to(device), step, autocast_dtype, eval_loss, scaler
        )
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr or use --mixed-precision no")
        losses.append(loss)
        selections += chosen
        it_s = step / (time.perf_counter() - start)
        progress.update()
        progress.set_postfix(loss=f"{loss:.4f}")
        if on_event is not None:
            on_event({"step": step, "total": total, "loss": loss, "it_s": it_s, "eta_s": (total - step) / it_s})
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            _save_progress(unet, run_dir, losses, selections, run_config)
    progress.close()

    _save_progress(unet, run_dir, losses, selections, run_config)
    export(unet, run_dir / LORA_FILE, run_config=run_config)
    return run_dir


def _selection_loss(unet: torch.nn.Module, noise_scheduler: DDPMScheduler, cache: Encoded, cfg: TrainConfig):
    """Return the no-grad loss on `select_batches` fixed batches (fixed noise and timesteps): MPOP's Eq. 7 probe."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)  # separate from training so the loss curve is unchanged
    probes = []
    for k in range(cfg.select_batches):
        batch = cache.batch(torch.tensor([k % len(cache)]))
        noise = torch.randn(batch.latents.shape, generator=generator).to(batch.latents.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator)
        probes.append((batch, noise, t.to(batch.latents.device)))

    @torch.no_grad()
    def eval_loss() -> float:
        with opdiff.materialize(unet):
            return sum(diffusion_loss(unet, noise_scheduler, *p).item() for p in probes) / len(probes)

    return eval_loss


def _run_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir is not None:
        return Path(cfg.output_dir)
    return Path("runs") / f"{cfg.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _resolved(cfg: TrainConfig, dataset: Dataset) -> dict:
    """The run's config.json: resolved settings, the adapter, where the base and data came from."""
    base = Path(cfg.base).expanduser()
    return {
        "train": cfg.to_dict(),
        "adapter": cfg.adapter_config().to_dict(),
        "method": cfg.method,
        "base": str(base.resolve()) if base.exists() else cfg.base,
        "dataset": {
            "path": str(Path(cfg.data).resolve()),
            "hash": dataset.hash,
            "images": len(dataset),
            "skipped": [{"file": n, "reason": r} for n, r in dataset.skipped],
        },
        "opdiff_version": opdiff.__version__,
    }


def _save_progress(unet: torch.nn.Module, run_dir: Path, losses: list[float], selections: list[dict],
                   run_config: dict) -> None:
    """Write the uncollapsed trainable state, the loss curve and any selection log (each file atomically)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in opdiff.training_state_dict(unet).items()}
    atomic_save(state, run_dir / TRAINING_FILE, {"opdiff_config": json.dumps(run_config, sort_keys=True)})
    tmp = run_dir / (LOSSES_FILE + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows((i, f"{loss:.6f}") for i, loss in enumerate(losses, start=1))
    tmp.replace(run_dir / LOSSES_FILE)
    if selections:
        (run_dir / "selection.json").write_text(json.dumps(selections, indent=2), encoding="utf-8")
