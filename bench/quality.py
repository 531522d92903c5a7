"""How well each adapter method learns the demo style on the bundled (pretrained) tiny model, per learning rate.

Every method in `opdiff.METHODS` is trained on assets/demo-data with the paper's settings (op-lora.txt
Sec. 5.1: r = 4, alpha = 4, AdamW at a constant learning rate, batch 1, 2 epochs = 48 steps) at each
learning rate of a sweep over three orders of magnitude. Per run it prints:

- train loss: the mean training loss over the last epoch (single steps are noisy: one image, one timestep);
- held-out loss: the epsilon loss on 24 fresh images of the demo style (make_demo_data.py scenes 24-47,
  never trained on) with fixed noise and timesteps (`--probes` per image), the same draws for every run;
- demo CMMD: CMMD (x 1000, lower is closer) between one generated image per training caption (op-lora.txt
  Sec. 4.1 protocol, caption i from seed i) and the training images, embedded with the bundled tiny CLIP
  (assets/tiny-clip). This is a DEMO metric: the reference CMMD uses CLIP ViT-L/14 at 336 px.

Rows `base` (no adapter) and `style images` (CMMD of the held-out style images themselves: the floor a
perfect style match reaches with this CLIP) frame the table.

MPOP's warm-up and MPOR's selection interval are scaled to the 48-step run (defaults assume long runs and
would never select): MPOP selects after a quarter of the run, MPOR finishes its rounds by half of it.

    nice -n 19 python bench/quality.py [--methods lora,op-lora] [--lrs 1e-4 1e-3 1e-2] [--json FILE] 2>/dev/null

The table goes to stdout, training progress bars to stderr.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from PIL import Image

import opdiff
from metrics import ClipEmbedder, cmmd
from pipelines.config import BUNDLED_DATA, BUNDLED_MODEL, TrainConfig
from pipelines.data import scan_dataset
from pipelines.encoding import Encoded, encode_dataset, native_resolution
from pipelines.model import load_pipeline
from pipelines.step import diffusion_loss
from pipelines.train import train

REPO = Path(__file__).resolve().parent.parent
TINY_CLIP = REPO / "assets" / "tiny-clip"
TINY_CLIP_WEIGHTS = "open_clip_model.safetensors"
DEFAULT_LRS = (1e-4, 1e-3, 1e-2)


def load_demo_clip(folder: Path = TINY_CLIP) -> ClipEmbedder:
    """Return the bundled tiny CLIP (an open_clip local model folder) as a CMMD image embedder."""
    folder = folder.resolve()
    return ClipEmbedder.load(f"local-dir:{folder}", checkpoint=folder / TINY_CLIP_WEIGHTS)


def _demo_script():
    spec = importlib.util.spec_from_file_location("assets_make_demo_data", REPO / "assets" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_held_out(folder: Path, first: int, count: int) -> Path:
    """Write demo-style images ``first .. first + count - 1`` of make_demo_data.py with captions; return the folder."""
    demo = _demo_script()
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(demo.scenes(first + count)[first:], start=first):
        demo.render(scene, i).save(folder / f"style_{i:02d}.png")
        (folder / f"style_{i:02d}.txt").write_text(scene.caption() + "\n", encoding="utf-8")
    return folder


def fixed_probes(cache: Encoded, probes: int, seed: int) -> list[tuple[Encoded, torch.Tensor, torch.Tensor]]:
    """Return (batch, noise, timesteps) per image: ``probes`` stratified timesteps each, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(len(cache)):
        batch = cache.batch(torch.full((probes,), i))
        noise = torch.randn(batch.latents.shape, generator=g)  # (P, 4, h, w)
        # One timestep in each of `probes` equal strata of [0, 1000): every run sees the same spread of noise levels.
        t = ((torch.arange(probes) + torch.rand(probes, generator=g)) * 1000 / probes).long()
        out.append((batch, noise, t))
    return out


@torch.no_grad()
def held_out_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, probes: list) -> float:
    """Return the mean epsilon loss of ``unet`` over the fixed probes."""
    with opdiff.materialize(unet):
        return float(np.mean([diffusion_loss(unet, scheduler, *p).item() for p in probes]))


@torch.no_grad()
def generate(pipe: StableDiffusionXLPipeline, captions: list[str], size: int, steps: int, seed: int) -> list[Image.Image]:
    """Return one image per caption, caption i from seed ``seed + i`` (CPU noise), in one batched call."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
    return pipe(captions, height=size, width=size, num_inference_steps=steps, guidance_scale=5.0,
                generator=generators).images


def selection_settings(method: str, total_steps: int) -> dict:
    """Return MPOP/MPOR selection settings scaled to a run of ``total_steps`` (empty for other methods)."""
    if method == "lora-over-mpop":
        return {"select_warmup_steps": max(1, total_steps // 4)}
    if method == "lora-over-mpor":
        split = opdiff.AdapterConfig.select_split
        return {"select_every": max(1, total_steps // (2 * split))}
    return {}


def run(args: argparse.Namespace) -> list[dict]:
    """Train every (method, lr), score it, print a row as it finishes; return all rows."""
    torch.set_num_threads(args.threads)
    dataset = scan_dataset(args.data)
    captions = [ex.caption for ex in dataset.examples]
    train_images = [Image.open(ex.path).convert("RGB") for ex in dataset.examples]
    clip = load_demo_clip(args.clip)
    reference = clip.embed(train_images, progress=False)  # (24, D)

    base = load_pipeline(args.base, device="cpu")
    base.set_progress_bar_config(disable=True)
    size = native_resolution(base)
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    total_steps = args.epochs * len(dataset)
    with tempfile.TemporaryDirectory() as tmp:
        held_out = scan_dataset(write_held_out(Path(tmp) / "held-out", len(dataset), args.held_out))
        style_images = [Image.open(ex.path).convert("RGB") for ex in held_out.examples]
        probes = fixed_probes(encode_dataset(base, held_out, size), args.probes, args.seed)

        rows = [
            {"method": "style images", "lr": None, "train_loss": None, "held_out_loss": None,
             "demo_cmmd": cmmd(reference, clip.embed(style_images, progress=False)), "seconds": 0.0},
        ]
        start = time.perf_counter()
        base_images = generate(base, captions, size, args.sample_steps, args.seed)
        rows.append({"method": "base", "lr": None, "train_loss": None,
                     "held_out_loss": held_out_loss(base.unet, scheduler, probes),
                     "demo_cmmd": cmmd(reference, clip.embed(base_images, progress=False)),
                     "seconds": time.perf_counter() - start})
        del base
        print_header()
        for row in rows:
            print_row(row)

        for method in args.methods:
            for lr in args.lrs:
                start = time.perf_counter()
                pipe = load_pipeline(args.base, device="cpu")
                pipe.set_progress_bar_config(disable=True)
                cfg = TrainConfig(data=args.data, output_dir=Path(tmp) / f"{method}-{lr:g}", method=method, lr=lr,
                                  epochs=args.epochs, seed=args.seed, device="cpu",
                                  **selection_settings(method, total_steps))
                run_dir = train(cfg, pipe=pipe)  # pipe.unet now carries the collapsed adapter
                with open(run_dir / "losses.csv", newline="") as f:
                    losses = [float(r["loss"]) for r in csv.DictReader(f)]
                images = generate(pipe, captions, size, args.sample_steps, args.seed)
                row = {
                    "method": method,
                    "lr": lr,
                    "train_loss": float(np.mean(losses[-len(dataset):])),
                    "held_out_loss": held_out_loss(pipe.unet, scheduler, probes),
                    "demo_cmmd": cmmd(reference, clip.embed(images, progress=False)),
                    "seconds": time.perf_counter() - start,
                }
                rows.append(row)
                print_row(row)
    return rows


def _fmt(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or a dash as wide when there is none."""
    if value is None or math.isnan(value):
        return "-".rjust(int(spec.split(".")[0]))
    return format(value, spec)


def print_header() -> None:
    """Print the table's column titles."""
    print(f"{'method':<16} {'lr':>7} {'train loss':>10} {'held-out loss':>13} {'demo CMMD':>9} {'s':>5}")


def print_row(row: dict) -> None:
    """Print one table row (a dash where a column does not apply)."""
    print(f"{row['method']:<16} {_fmt(row['lr'], '7.0e')} {_fmt(row['train_loss'], '10.4f')} "
          f"{_fmt(row['held_out_loss'], '13.4f')} {_fmt(row['demo_cmmd'], '9.3f')} {row['seconds']:5.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(opdiff.METHODS),
                        help="comma-separated methods")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="learning rates")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the demo set")
    parser.add_argument("--seed", type=int, default=0, help="training, probe and sampling seed")
    parser.add_argument("--base", default=str(BUNDLED_MODEL), help="base model")
    parser.add_argument("--data", type=Path, default=BUNDLED_DATA, help="training images with captions")
    parser.add_argument("--clip", type=Path, default=TINY_CLIP, help="open_clip local model folder for demo CMMD")
    parser.add_argument("--held-out", type=int, default=24, help="fresh demo-style images for the held-out loss")
    parser.add_argument("--probes", type=int, default=8, help="fixed (noise, timestep) draws per held-out image")
    parser.add_argument("--sample-steps", type=int, default=20, help="denoising steps per generated image")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    unknown = sorted(set(args.methods) - set(opdiff.METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(opdiff.METHODS)}")
    print(f"seed {args.seed}; demo CMMD uses the tiny CLIP in {args.clip} (a demo metric, not ViT-L/14-336)")
    rows = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
