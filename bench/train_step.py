"""What one training step costs: time and peak memory, with and without the latent cache, and at SDXL's full size.

1. The bundled tiny SDXL on this machine: a `pipelines.train` step (forward + backward + AdamW at 64 px) with
   latents and prompt embeddings cached (the default), uncached (the VAE and both text encoders run every
   step), and cached with gradient checkpointing, as seconds per step, the ratios, and peak memory above the
   model's. Also the time to fill the cache for the dataset from scratch, and from a warm `--cache-dir` (no VAE,
   no text encoder).
2. The full-size SDXL U-Net (assets/sdxl-base-1.0/unet/config.json, 2.6B parameters) with random weights at a
   reduced resolution (default 256 px: 32 x 32 latents), batch 1, a LoRA on the attention projections: seconds
   per step and peak memory on this machine's device, without and with gradient checkpointing. Weights are
   built on the meta device and filled in place, so the model exists once in memory (bf16: 5 GB; fp32: 10 GB).

Memory is the peak resident set size above the level before the measured part (sampled every 5 ms; CPU) or
torch.cuda.max_memory_allocated (GPU).

    python bench/train_step.py [--images 4] [--steps 10] [--sdxl-resolution 256] [--sdxl-steps 3]
                               [--sdxl-dtype bf16|fp32] [--skip-sdxl] [--skip-tiny]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import opdiff  # noqa: E402
from pipelines.config import BUNDLED_DATA, BUNDLED_MODEL, TrainConfig  # noqa: E402
from pipelines.data import scan_dataset  # noqa: E402
from pipelines.encoding import Encoded  # noqa: E402
from pipelines.model import load_pipeline  # noqa: E402
from pipelines.step import Trainer  # noqa: E402
from pipelines.training_data import TrainingData  # noqa: E402

SDXL_CONFIG = BUNDLED_MODEL.parent / "sdxl-base-1.0" / "unet" / "config.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@contextmanager
def peak_memory(device: str):
    """Yield a dict that, after the block, holds `peak_mb`: the block's peak memory above its starting level."""
    result: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    process, stop, peak = psutil.Process(), threading.Event(), [0]
    start = process.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["peak_mb"] = (max(peak[0], process.memory_info().rss) - start) / 2**20


def timed(step: Callable[[], None], steps: int, device: str) -> list[float]:
    """Seconds of each of `steps` calls of `step`, after one untimed warm-up call."""
    times = []
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def _demo_subset(folder: Path, images: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted(BUNDLED_DATA.glob("*.png"))[:images]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return folder


def tiny(images: int, steps: int, device: str, threads: int) -> None:
    """Part 1: the bundled model, cached vs uncached (each in a fresh process, so memory starts level), and the
    cache fill cold vs warm."""
    with tempfile.TemporaryDirectory() as tmp:
        dataset = scan_dataset(_demo_subset(Path(tmp) / "data", images))
        fills = {}
        for name in ("cold", "warm"):
            pipe = load_pipeline(BUNDLED_MODEL, device="cpu")
            t0 = time.perf_counter()
            TrainingData(pipe, dataset, TrainConfig(resolution=64, flip=True, cache_dir=Path(tmp) / "cache"), device)
            fills[name] = time.perf_counter() - t0
    print(f"Bundled tiny SDXL ({BUNDLED_MODEL.name}), {device}, {threads} threads, 64 px, {images} images, batch 1, "
          f"lora; median of {steps} steps after 1 warm-up")
    print(f"  fill the cache (images + mirrors + captions): {fills['cold']:.3f} s from scratch, "
          f"{fills['warm']:.3f} s from a warm --cache-dir ({fills['cold'] / fills['warm']:.1f}x)")
    rows = {}
    for variant in ("cached", "uncached", "checkpointing"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--images", str(images), "--steps",
                              str(steps), "--threads", str(threads)], capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {'':10} {'s/step':>9} {'peak MB':>9}")
    for name, row in rows.items():
        print(f"  {name:10} {row['s_step']:9.4f} {row['peak_mb']:9.1f}")
    print(f"  uncached / cached time per step: {rows['uncached']['s_step'] / rows['cached']['s_step']:.2f}x")
    on, off = rows["checkpointing"], rows["cached"]
    print(f"  gradient checkpointing on / off (cached): time {on['s_step'] / off['s_step']:.2f}x, "
          f"peak memory {on['peak_mb'] / off['peak_mb']:.2f}x")


def tiny_variant(variant: str, images: int, steps: int, device: str) -> None:
    """One of part 1's variants; prints {s_step, peak_mb} as JSON (peak above the loaded pipeline)."""
    with tempfile.TemporaryDirectory() as tmp:
        dataset = scan_dataset(_demo_subset(Path(tmp) / "data", images))
        pipe = load_pipeline(BUNDLED_MODEL, device="cpu")
        cfg = TrainConfig(resolution=64, cache_latents=variant != "uncached",
                          gradient_checkpointing=variant == "checkpointing")
        with peak_memory(device) as memory:
            data = TrainingData(pipe, dataset, cfg, device)
            times = _train_steps(pipe, data, cfg, steps, device)
    print(json.dumps({"s_step": statistics.median(times), "peak_mb": memory["peak_mb"]}))


def _train_steps(pipe, data: TrainingData, cfg: TrainConfig, steps: int, device: str) -> list[float]:
    unet = pipe.unet
    torch.manual_seed(0)
    opdiff.inject(unet, cfg.adapter)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train().to(device)
    optimizer = torch.optim.AdamW(opdiff.param_groups(unet, cfg.lr))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    rng, counter = torch.Generator().manual_seed(0), [0]
    trainer = Trainer(unet, optimizer, scheduler)

    def step() -> None:
        counter[0] += 1
        index = [counter[0] % len(data.examples)]
        batch = data.batch(index, data.views(index, rng))
        noise = torch.randn(batch.latents.shape, generator=rng).to(device)
        trainer.step(counter[0], batch, noise, torch.tensor([500], device=device))

    return timed(step, steps, device)


def random_sdxl_unet(dtype: torch.dtype, device: str) -> UNet2DConditionModel:
    """The full SDXL U-Net with cheap random weights (normal 0.02; norms 1, biases 0), allocated once."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters born in `dtype`: no float32 copy, ever
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(json.loads(SDXL_CONFIG.read_text()))
    finally:
        torch.set_default_dtype(default)
    unet = unet.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02, generator=generator)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return unet.requires_grad_(False)


def sdxl(resolution: int, steps: int, dtype_name: str, device: str) -> None:
    """Part 2: one LoRA training step of the full-size SDXL U-Net, without and with gradient checkpointing."""
    dtype = DTYPES[dtype_name]
    t0 = time.perf_counter()
    with peak_memory(device) as build:
        unet = random_sdxl_unet(dtype, device)
    params = sum(p.numel() for p in unet.parameters())
    print(f"\nFull-size SDXL U-Net ({params / 1e9:.2f}B parameters, random weights, {dtype_name}), {device}, "
          f"{torch.get_num_threads()} threads, {resolution} px ({resolution // 8}x{resolution // 8} latents), "
          "batch 1, "
          f"lora r=4 on to_q,to_k,to_v,to_out.0, autocast {dtype_name}; median of {steps} steps after 1 warm-up")
    print(f"  built in {time.perf_counter() - t0:.1f} s, {build['peak_mb']:.0f} MB")
    torch.manual_seed(0)
    opdiff.inject(unet, opdiff.AdapterConfig(method="lora"))
    for p in opdiff.trainable_parameters(unet):
        p.data = p.data.float()  # as pipelines.train does: adapter and optimizer in float32 over a 16-bit base
    unet.train()
    optimizer = torch.optim.AdamW(opdiff.param_groups(unet, 1e-4))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    batch = Encoded(
        latents=torch.randn(1, 4, side, side, generator=g),
        prompt_embeds=torch.randn(1, 77, 2048, generator=g).to(dtype),
        pooled=torch.randn(1, 1280, generator=g).to(dtype),
        time_ids=torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32),
    ).to(device)
    noise = torch.randn(batch.latents.shape, generator=g).to(device)
    autocast = dtype if dtype != torch.float32 else None
    counter = [0]
    trainer = Trainer(unet, optimizer, scheduler, autocast)

    def step() -> None:
        counter[0] += 1
        trainer.step(counter[0], batch, noise, torch.tensor([500], device=device))

    trainable = sum(p.numel() for p in opdiff.trainable_parameters(unet))
    rows = {}
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        with peak_memory(device) as memory:
            times = timed(step, steps, device)
        rows[checkpointing] = (statistics.median(times), memory["peak_mb"])
        print(f"  gradient checkpointing {'on ' if checkpointing else 'off'}: {rows[checkpointing][0]:.2f} s/step "
              f"(steps: {', '.join(f'{t:.2f}' for t in times)}), peak {memory['peak_mb']:.0f} MB above the weights",
              flush=True)
    print(f"  {trainable:,} trainable parameters; checkpointing on / off: time {rows[True][0] / rows[False][0]:.2f}x,"
          f" peak memory {rows[True][1] / rows[False][1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="bundled demo images to train on (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps on the bundled model (default 10)")
    parser.add_argument("--sdxl-resolution", type=int, default=256, help="image size for the full-size U-Net "
                        "(default 256)")
    parser.add_argument("--sdxl-steps", type=int, default=3, help="timed steps on the full-size U-Net (default 3)")
    parser.add_argument("--sdxl-dtype", choices=list(DTYPES), default="bf16",
                        help="full-size U-Net weights and autocast dtype (default bf16: 5 GB instead of 10)")
    parser.add_argument("--skip-tiny", action="store_true", help="skip part 1 (bundled model)")
    parser.add_argument("--skip-sdxl", action="store_true", help="skip part 2 (full-size U-Net)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    # part 1's subprocesses
    parser.add_argument("--variant", choices=("cached", "uncached", "checkpointing"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variant:
        tiny_variant(args.variant, args.images, args.steps, device)
        return
    if not args.skip_tiny:
        tiny(args.images, args.steps, device, torch.get_num_threads())
    if not args.skip_sdxl:
        sdxl(args.sdxl_resolution, args.sdxl_steps, args.sdxl_dtype, device)


if __name__ == "__main__":
    main()
