"""Pretrain the bundled tiny SDXL-architecture model on the procedural world, so that it draws what prompts name.

Starts from the random weights ``build_tiny_sdxl.py`` writes and trains, on the CPU, in two stages:

1. VAE: an autoencoder on the plain world and on the world painted with random looks (outlines, brush
   strokes, muted colours, paper; see ``procedural.py``), with an L1 reconstruction loss and a small KL term.
   The looks make it a general codec for the 64 px images here, as SDXL's VAE was trained on broad photos
   rather than on its U-Net's data, so that a style the U-Net never saw can still be decoded once a LoRA
   learns it. Afterwards its latents are shifted and scaled, exactly, by folding an affine map into
   ``quant_conv`` and ``post_quant_conv``, so that latents times the config's ``scaling_factor`` (SDXL's
   0.13025, unchanged) have zero mean and unit variance per channel.
2. U-Net and both text encoders, jointly, from scratch, on the plain world only (flat shapes, no style):
   DDPM epsilon loss, L = || eps_theta(x_t, t, text) - eps ||^2 with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t)
   eps (as SDXL), weighted per sample by min(SNR_t, gamma) / SNR_t ("Min-SNR", Hang et al. 2023), which
   speeds up convergence. The text encoders are trained too because random ones hardly separate
   "a red circle on a blue background" from "a blue circle on a red background" (their hidden states are
   0.995 cosine-similar); LDM trained its text transformer jointly with the U-Net from scratch in the same
   way. A share of captions is dropped to the all-zero conditioning that SDXL pipelines use for an empty
   negative prompt (``force_zeros_for_empty_prompt``), which is what classifier-free guidance needs.

Both stages use AdamW at a constant rate after a short warm-up and keep an exponential moving average of
the weights, which is what gets saved. Every random draw of step k comes from a generator seeded with
(seed, stage, k), so a run killed and resumed from its checkpoint (``--work``, every ``checkpoint_every``
steps) gives the same weights as one that never stopped, and raising a step count continues a finished run.

The output is a diffusers folder with the same files, configs and tokenizers as ``build_tiny_sdxl.py``
writes, weights in float16.

Usage: ``nice -n 19 python assets/pretrain_tiny_sdxl.py [--work .work-pretrain] [--out DIR] [--unet-steps N]``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ASSETS = Path(__file__).resolve().parent
DEFAULT_WORK = ASSETS.parent / ".work-pretrain"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TRAINED = ("text_encoder", "text_encoder_2", "vae", "unet")
PREVIEW_PROMPTS = (
    "a red circle on a blue background",
    "a green square on a yellow background",
    "a white star on a purple striped background",
    "a painting of a purple circle on the right on a teal background, opdiff style",
    "a painting of a yellow house on the left on a pink background",
    "an orange fish on a teal dotted background",
)


def _load_script(name: str):
    # assets/ holds scripts, not a package; load a sibling by path (once per process).
    module_name = f"assets_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ASSETS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[module_name]


build_tiny_sdxl = _load_script("build_tiny_sdxl")
procedural = _load_script("procedural")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the pretrained weights; the defaults made the bundled ones."""

    seed: int = 0
    """Seed of the procedural worlds and of every step's data, noise and timesteps."""
    world_size: int = 8000
    """Plain-world images (pre-rendered once, 64 px); the U-Net trains on these, the VAE on them and the looked ones."""
    looks_size: int = 4000
    """World images with random looks, for the VAE only."""
    vae_steps: int = 1400
    """VAE optimizer steps."""
    vae_batch: int = 16
    """VAE images per step, half plain, half looked."""
    vae_lr: float = 2e-3
    """VAE AdamW learning rate."""
    kl_weight: float = 1e-4
    """Weight of the KL term per latent element next to the per-pixel L1 reconstruction loss."""
    thumbnail_weight: float = 1.0
    """Initial weight of the warm-start loss tying latent channels 0-2 to the 8 x 8 average of the image."""
    thumbnail_steps: int = 400
    """VAE steps over which that weight fades linearly to 0."""
    unet_steps: int = 2300
    """U-Net (and text encoder) optimizer steps."""
    unet_batch: int = 64
    """Images per U-Net step."""
    unet_lr: float = 1e-3
    """U-Net and text encoder AdamW learning rate."""
    warmup: int = 100
    """Linear learning-rate warm-up steps, each stage."""
    ema_decay: float = 0.998
    """Decay of the weights' moving average (ramped up from 0.9 over the first steps)."""
    caption_dropout: float = 0.1
    """Share of captions replaced by the all-zero unconditional embedding (for classifier-free guidance)."""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weighting: min(SNR, gamma) / SNR per sample."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints in the work folder."""

    def identity(self, *free: str) -> dict:
        """Return the settings a stage's checkpoint must share to be resumed: all but ``free`` and checkpoint_every.

        A stage leaves out its own step count (more steps continue a run) and those of later stages; the U-Net
        stage keeps vae_steps, since its data are the VAE's latents.
        """
        return {k: v for k, v in asdict(self).items() if k not in (*free, "checkpoint_every")}


# ---------------------------------------------------------------------------------------------
# Shared pieces


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """Return the CPU generator of one step: a function of (seed, stage, step) only, so resuming changes nothing."""
    state = np.random.SeedSequence([seed, stage, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def world_cache(settings: Settings, work: Path, looks: bool) -> tuple[torch.Tensor, list[str]]:
    """Return the world's images as uint8 (N, 3, 64, 64) and captions, rendered once and cached in ``work``."""
    count = settings.looks_size if looks else settings.world_size
    path = work / f"world-seed{settings.seed}-n{count}-{'looks' if looks else 'plain'}.npz"
    if not path.is_file():
        images, captions = procedural.world(count, settings.seed, looks=looks)  # (N, 64, 64, 3)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, captions=np.array(captions))
        os.replace(tmp, path)
    data = np.load(path)
    return torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous(), data["captions"].tolist()


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Return uint8 images (B, 3, H, W) as float pixels in [-1, 1], the VAE's range."""
    return images.float() / 127.5 - 1.0


class Ema:
    """Exponential moving average of a set of parameters; ``decay`` ramps up as (1 + n) / (10 + n)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for shadow, p in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(p, 1 - d)

    def state(self) -> list[torch.Tensor]:
        return self.shadow

    def load(self, shadow: list[torch.Tensor]) -> None:
        for mine, saved in zip(self.shadow, shadow, strict=True):
            mine.copy_(saved)


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, identity: dict, steps: int) -> dict | None:
    """Return the stage checkpoint at ``path`` if there is one; raise if it belongs to other settings."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, weights_only=True)
    if ckpt["identity"] != identity:
        raise ValueError(f"{path} was written with other settings ({ckpt['identity']}); use another --work folder")
    if ckpt["step"] > steps:
        raise ValueError(f"{path} is at step {ckpt['step']}, past the {steps} asked for; use another --work folder")
    return ckpt


def _set_lr(optimizer: torch.optim.Optimizer, base: float, step: int, warmup: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * min(1.0, (step + 1) / warmup)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_loop(
    name: str,
    stage: int,
    modules: dict[str, torch.nn.Module],
    loss_fn: Callable[[torch.Generator, int], torch.Tensor],
    steps: int,
    lr: float,
    settings: Settings,
    identity: dict,
    work: Path,
    weight_decay: float = 0.0,
    no_decay: Callable[[str, torch.nn.Parameter], bool] | None = None,
) -> None:
    """Train ``modules`` for ``steps`` AdamW steps on ``loss_fn(step generator, step)``, resuming from ``work/<name>.pt``.

    ``settings`` supplies seed, warmup, ema_decay and checkpoint_every; a checkpoint resumes only under the same
    ``identity`` (the settings the stage depends on). Parameters for which
    ``no_decay(name, param)`` holds get no weight decay. Leaves the modules holding their averaged weights.
    """
    named = [(n, p) for m in modules.values() for n, p in m.named_parameters()]
    params = [p for _, p in named]
    skip = no_decay or (lambda n, p: False)
    groups = [
        {"params": [p for n, p in named if not skip(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if skip(n, p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    ema = Ema(params, settings.ema_decay)
    path = work / f"{name}.pt"
    ckpt = _load_checkpoint(path, identity, steps)
    start = 0
    if ckpt is not None:
        for key, module in modules.items():
            module.load_state_dict(ckpt["model"][key])
        optimizer.load_state_dict(ckpt["optimizer"])
        ema.load(ckpt["ema"])
        start = ckpt["step"]
        _log(f"{name}: resuming at step {start} of {steps}")
    for module in modules.values():
        module.train()

    def save(step: int) -> None:
        payload = {
            "identity": identity,
            "step": step,
            "model": {key: module.state_dict() for key, module in modules.items()},
            "optimizer": optimizer.state_dict(),
            "ema": ema.state(),
        }
        _save_checkpoint(path, payload)

    recent, t0 = [], time.perf_counter()
    for step in range(start, steps):
        _set_lr(optimizer, lr, step, settings.warmup)
        loss = loss_fn(step_generator(settings.seed, stage, step), step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(step)
        recent.append(loss.item())
        if not math.isfinite(recent[-1]):
            raise FloatingPointError(f"{name}: loss is {recent[-1]} at step {step + 1}")
        done = step + 1
        if done % 25 == 0 or done == steps:
            per_step = (time.perf_counter() - t0) / len(recent)
            _log(f"{name} step {done}/{steps} loss {np.mean(recent):.4f} ({per_step:.2f} s/step)")
            recent, t0 = [], time.perf_counter()
        if done % settings.checkpoint_every == 0 or done == steps:
            save(done)
    with torch.no_grad():
        for p, shadow in zip(params, ema.state(), strict=True):
            p.copy_(shadow)
    for module in modules.values():
        module.eval()


# ---------------------------------------------------------------------------------------------
# Stage 1: VAE


def train_vae(vae: AutoencoderKL, plain: torch.Tensor, looked: torch.Tensor, settings: Settings, work: Path) -> None:
    """Train ``vae`` (in place) as an autoencoder on plain and looked world images, half of each per batch."""
    half = settings.vae_batch // 2
    with torch.no_grad():
        # The random init's posterior std is about 1 around means near 0: the decoder would first see noise.
        # A small initial std (log-variance -10) lets reconstruction start at once; the KL term may raise it.
        vae.quant_conv.bias[vae.config.latent_channels :] = -10.0
    latent_elements = vae.config.latent_channels * (plain.shape[-1] // 8) ** 2

    def loss_fn(g: torch.Generator, step: int) -> torch.Tensor:
        index_plain = torch.randint(len(plain), (settings.vae_batch - half,), generator=g)
        index_looked = torch.randint(len(looked), (half,), generator=g)
        x = to_pixels(torch.cat([plain[index_plain], looked[index_looked]]))  # (B, 3, 64, 64)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)  # (B, 4, 8, 8)
        reconstruction = vae.decode(z).sample  # (B, 3, 64, 64)
        kl = posterior.kl().mean() / latent_elements  # per latent element
        # Warm start: a thumbnail is a latent the encoder finds at once and the decoder can learn from; its
        # weight fades to 0 so that all four channels end up serving the reconstruction.
        thumbnail = (posterior.mean[:, :3] - F.avg_pool2d(x, 8)).abs().mean()  # (B, 3, 8, 8) vs 8 x 8 means
        fade = max(0.0, 1.0 - step / settings.thumbnail_steps)
        return (reconstruction - x).abs().mean() + settings.kl_weight * kl + settings.thumbnail_weight * fade * thumbnail

    train_loop("vae", 1, {"vae": vae}, loss_fn, settings.vae_steps, settings.vae_lr, settings,
               settings.identity("vae_steps", "unet_steps"), work)


@torch.no_grad()
def latent_means(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Return the posterior means (N, 4, h, w) of uint8 images (N, 3, H, W), unscaled."""
    return torch.cat([vae.encode(to_pixels(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)])


@torch.no_grad()
def normalize_latents(vae: AutoencoderKL, images: torch.Tensor) -> None:
    """Fold an exact per-channel affine map into ``vae`` so latents x scaling_factor have mean 0 and std 1 on ``images``.

    New latent z' = a (z - m): quant_conv's mean rows are scaled by a and shifted, its log-variance rows
    shifted by 2 log a; post_quant_conv's input weights are divided by a and its bias absorbs m. Decoding
    z' then gives exactly what decoding z gave.
    """
    latents = latent_means(vae, images)  # (N, 4, h, w)
    m = latents.mean(dim=(0, 2, 3))  # (4,)
    a = 1.0 / (latents.std(dim=(0, 2, 3)) * vae.config.scaling_factor)  # (4,)
    c = vae.config.latent_channels
    q, pq = vae.quant_conv, vae.post_quant_conv  # 1x1 convs: (2c -> 2c) and (c -> c)
    pq.bias += pq.weight[:, :, 0, 0] @ m  # uses the old weights, so before they change
    pq.weight /= a[None, :, None, None]
    q.weight[:c] *= a[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - m) * a
    q.bias[c:] += 2 * torch.log(a)


# ---------------------------------------------------------------------------------------------
# Stage 2: U-Net and text encoders


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Return the captions' ids (N, 77) as SDXL pipelines tokenize prompts (padded, truncated)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(
    text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, ids: torch.Tensor, ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return SDXL's conditioning as ``StableDiffusionXLPipeline.encode_prompt`` computes it, with gradients.

    prompt embeds (B, 77, D1 + D2): both encoders' penultimate hidden states, concatenated; pooled (B, P):
    text_encoder_2's projected output at the end token.
    """
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]  # (B, 77, D1)
    out_2 = text_encoder_2(ids_2, output_hidden_states=True)
    embeds = torch.cat([hidden, out_2.hidden_states[-2]], dim=-1)  # (B, 77, D1 + D2)
    return embeds, out_2.text_embeds  # (B, P)


def train_unet(pipe: StableDiffusionXLPipeline, latents: torch.Tensor, captions: list[str], settings: Settings,
               work: Path) -> None:
    """Train the U-Net and both text encoders of ``pipe`` (in place) on scaled latents (N, 4, h, w) and captions."""
    unet, te1, te2 = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    ids, ids_2 = token_ids(pipe.tokenizer, captions), token_ids(pipe.tokenizer_2, captions)  # (N, 77) each
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = scheduler.alphas_cumprod  # (1000,)
    size = latents.shape[-1] * pipe.vae_scale_factor
    # SDXL micro-conditioning: original size, crop corner, target size; always the full 64 px image here.
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)  # (1, 6)
    b = settings.unet_batch

    def loss_fn(g: torch.Generator, step: int) -> torch.Tensor:
        index = torch.randint(len(latents), (b,), generator=g)
        noise = torch.randn((b, *latents.shape[1:]), generator=g)  # (B, 4, h, w)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        keep = (torch.rand(b, generator=g) >= settings.caption_dropout).float()  # (B,)
        embeds, pooled = encode_text(te1, te2, ids[index], ids_2[index])
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]  # dropped: all-zero conditioning
        noisy = scheduler.add_noise(latents[index], noise, t)  # (B, 4, h, w)
        pred = unet(noisy, t, encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(b, 6)}).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])  # (B,)
        weight = snr.clamp(max=settings.min_snr_gamma) / snr
        return (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()

    modules = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    train_loop("unet", 2, modules, loss_fn, settings.unet_steps, settings.unet_lr, settings,
               settings.identity("unet_steps"), work)


# ---------------------------------------------------------------------------------------------
# The whole run


def pretrain(settings: Settings, work: Path) -> StableDiffusionXLPipeline:
    """Run both stages (resuming from ``work`` where checkpoints are) and return the pretrained pipeline."""
    work.mkdir(parents=True, exist_ok=True)
    init = build_tiny_sdxl.build(work / "random-init")  # the random weights the build script commits to
    pipe = StableDiffusionXLPipeline.from_pretrained(init, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    (work / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")

    start = time.perf_counter()
    plain, captions = world_cache(settings, work, looks=False)
    looked, _ = world_cache(settings, work, looks=True)
    _log(f"world: {len(plain)} plain + {len(looked)} looked images ({time.perf_counter() - start:.0f} s)")

    train_vae(pipe.vae, plain, looked, settings, work)
    normalize_latents(pipe.vae, plain)
    latents = latent_means(pipe.vae, plain) * pipe.vae.config.scaling_factor  # (N, 4, 8, 8), ~unit variance
    _log(f"latents: mean {latents.mean():.3f} std {latents.std():.3f}")

    train_unet(pipe, latents, captions, settings, work)
    _log(f"pretraining took {time.perf_counter() - start:.0f} s")
    return pipe


def save(pipe: StableDiffusionXLPipeline, out: Path) -> Path:
    """Write the pipeline as ``build_tiny_sdxl.py`` lays it out (same files and configs), weights in float16.

    Returns ``out``.
    """
    build_tiny_sdxl.build(out)  # tokenizers, configs, model_index.json: exactly the build script's
    configs = {path: path.read_bytes() for path in out.glob("*/config.json")}
    for name in TRAINED:
        getattr(pipe, name).save_pretrained(out / name)
    for path, content in configs.items():
        path.write_bytes(content)  # save_pretrained would add where the weights were loaded from
    for path in sorted(out.glob("*/*.safetensors")):
        build_tiny_sdxl.to_fp16(path)
    return out


def preview(model: Path, out_file: Path, prompts: tuple[str, ...] = PREVIEW_PROMPTS, seeds: int = 4) -> Path:
    """Render ``seeds`` images per prompt (20 steps, guidance 5) from the saved model into one grid PNG; return it."""
    from PIL import Image

    pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    grid = Image.new("RGB", (64 * seeds, 64 * len(prompts)))
    for row, prompt in enumerate(prompts):
        generators = [torch.Generator().manual_seed(s) for s in range(seeds)]
        images = pipe([prompt] * seeds, height=64, width=64, num_inference_steps=20, guidance_scale=5.0,
                      generator=generators).images
        for col, image in enumerate(images):
            grid.paste(image, (64 * col, 64 * row))
    grid.save(out_file)
    return out_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Settings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"(default: {f.default})")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="folder for the rendered world and resumable checkpoints (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output model folder (default: WORK/tiny-sdxl)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; one is as fast for this tiny model and robust on a shared CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    pipe = pretrain(settings, args.work)
    out = save(pipe, args.out or args.work / "tiny-sdxl")
    _log(f"saved {out}; preview grid: {preview(out, args.work / 'preview.png')}")


if __name__ == "__main__":
    main()
