"""FLOPs of the paper protocol per method on full-size SDXL, counted on the meta device, and the time they imply.

Counts with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; elementwise work is not
counted) on the full-size SDXL U-Net and VAE built from their configs on the meta device: no weights, no memory,
runs anywhere in seconds.

- one training step per method: adapter generation + U-Net forward + backward at `--resolution`, batch 1;
- one generated image: `--steps` U-Net forwards at batch 2 (classifier-free guidance) + one VAE decode; every
  method samples from its collapsed LoRA, so this is the same for all of them;
- the protocol (op-lora.txt Sec. 4.1, `opdiff reproduce`): 2 epochs over N images = 2N steps, then N images.

Time = FLOPs / sustained throughput. The throughput a GPU sustains on SDXL at batch 1 is far below its peak
(small batches, attention, elementwise and memory-bound layers), and it was not measured here (no GPU): the hours
are printed for several assumed values (`--tflops`). Measure your GPU's with
`python bench/methods.py --full-size --full-res 1024` and divide the TFLOP per step by its seconds per step.

    python bench/flops.py [--resolution 1024] [--images 1221] [--steps 20] [--tflops 25,50,100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


import opdiff  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# SDXL base 1.0's VAE (vae/config.json of stabilityai/stable-diffusion-xl-base-1.0): the layer shapes FLOPs need.
SDXL_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": 1024}


def unet_inputs(batch: int, resolution: int) -> dict:
    side = resolution // 8
    return {"sample": torch.zeros(batch, 4, side, side), "timestep": torch.tensor([500] * batch),
            "encoder_hidden_states": torch.zeros(batch, 77, 2048),
            "added_cond_kwargs": {"text_embeds": torch.zeros(batch, 1280), "time_ids": torch.zeros(batch, 6)}}


def meta_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(json.loads((ASSETS / "sdxl-base-1.0" / "unet" / "config.json").read_text()))


def train_step_flops(method: str | None, resolution: int) -> int:
    """FLOPs of one training step (forward + backward, batch 1); None: the U-Net forward alone."""
    unet = meta_unet()
    with torch.device("meta"):
        inputs = unet_inputs(1, resolution)
        if method is None:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                unet(**inputs)
            return counter.get_total_flops()
        opdiff.inject(unet, opdiff.AdapterConfig(method=method))
        opdiff.method_of(unet).at_largest(unet)  # MPOP/MPOR: after their selection
        with FlopCounterMode(display=False) as counter, opdiff.materialize(unet):
            unet(**inputs).sample.sum().backward()
    return counter.get_total_flops()


def image_flops(resolution: int, steps: int) -> int:
    """FLOPs of one generated image: `steps` guided U-Net forwards (batch 2) and the VAE decode."""
    unet = meta_unet()
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(SDXL_VAE)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(**unet_inputs(2, resolution))
            vae.decode(torch.zeros(1, 4, resolution // 8, resolution // 8))
    # The decode ran once, the U-Net once: scale the U-Net part to `steps`.
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as unet_only:
        unet(**unet_inputs(2, resolution))
    return counter.get_total_flops() + (steps - 1) * unet_only.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(opdiff.METHODS), help="comma-separated methods (default: all)")
    parser.add_argument("--resolution", type=int, default=1024, help="image size (default 1024, the recipes')")
    parser.add_argument("--images", type=int, default=1221, help="training images = generated images (default "
                        "1221, Naruto; Monet is 1334)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per generated image (default 20, "
                        "opdiff's sample_steps)")
    parser.add_argument("--tflops", default="25,50,100", help="assumed sustained TFLOP/s, comma-separated "
                        "(default 25,50,100)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    per_image = image_flops(args.resolution, args.steps)
    forward = train_step_flops(None, args.resolution)
    rows = [(m, train_step_flops(m, args.resolution)) for m in methods]
    lora = dict(rows).get("lora") or train_step_flops("lora", args.resolution)
    steps = 2 * args.images
    print(f"Full-size SDXL (meta device), {args.resolution} px, batch 1, r=4, attention projections; "
          f"U-Net forward alone {forward / 1e12:.2f} TFLOP")
    print(f"one generated image ({args.steps} steps, guidance batch 2, VAE decode): {per_image / 1e12:.1f} TFLOP")
    rates = [float(t) for t in args.tflops.split(",")]
    print(f"protocol: {steps} training steps + {args.images} images; hours at an assumed sustained throughput")
    print(f"{'method':16} {'TFLOP/step':>11} {'x lora':>8} {'protocol PFLOP':>15}"
          + "".join(f"{f'h @ {r:g} TF/s':>14}" for r in rates))
    for method, flops in rows:
        total = steps * flops + args.images * per_image
        print(f"{method:16} {flops / 1e12:11.3f} {flops / lora:8.4f} {total / 1e15:15.1f}"
              + "".join(f"{total / (r * 1e12) / 3600:14.2f}" for r in rates))

if __name__ == "__main__":
    main()
