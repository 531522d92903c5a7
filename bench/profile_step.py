"""Where the time of one training step goes, per method: adapter generation vs the U-Net's forward and backward.

A step of an over-parameterized method has five parts:

    adapter forward    OP-LoRA's MLPs (op-lora.txt Eq. 4) / LoRA-Over's core contractions (lora-over.txt Eq. 2)
                       evaluated once for the step (`opdiff.materialize`); zero for plain LoRA and DoRA
    U-Net forward      the frozen U-Net with the adapters' A, B (and DoRA's m) applied by PEFT
    U-Net backward     gradients down to A, B, m
    adapter backward   from A, B, m back into the MLPs or cores
    optimizer          fused AdamW over the method's trainable parameters

Each part is timed with a synchronizing clock (median over `--steps` steps, after one warm-up step). The U-Net's
backward and the adapters' backward run in one `loss.backward()`, so the adapter backward is timed on its own in
an extra pass (the same generated tensors, backward from gradients of the same shapes) and subtracted. Then one
more step runs under `torch.profiler` and the operators that took most of it are listed.

    python bench/profile_step.py [--methods lora,op-lora,lora-over-mpo] [--full-size --resolution 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.nn.utils import parametrize
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from train_step import random_sdxl_unet  # noqa: E402

import opdiff  # noqa: E402
from pipelines.step import adamw  # noqa: E402

TINY_UNET = Path(__file__).resolve().parent.parent / "assets" / "tiny-sdxl" / "unet"
PARTS = ("adapter forward", "U-Net forward", "U-Net backward", "adapter backward", "optimizer")


def generated(unet: torch.nn.Module) -> list[torch.Tensor]:
    """Every reparameterized adapter tensor of the step (call inside `opdiff.materialize`)."""
    modules = [m for a in opdiff.adapted_layers(unet) for m in (a.lora_A, a.lora_B, a.magnitude) if m is not None]
    return [getattr(m, name) for m in modules if parametrize.is_parametrized(m) for name in m.parametrizations]


class Clock:
    def __init__(self, device: str):
        self.device = device

    def __call__(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


def step_parts(unet, optimizer, inputs: dict, clock: Clock) -> dict[str, float]:
    """One training step; seconds per part (the backward still holds both U-Net and adapter backward)."""
    t0 = clock()
    with opdiff.materialize(unet):
        with record_function("adapter forward"):
            generated(unet)
        t1 = clock()
        with record_function("U-Net forward"):
            loss = unet(**inputs).sample.float().square().mean()
        t2 = clock()
        with record_function("backward (U-Net + adapter)"):
            loss.backward()
        t3 = clock()
    with record_function("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    t4 = clock()
    return {"adapter forward": t1 - t0, "U-Net forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}


def adapter_backward(unet, optimizer, clock: Clock) -> float:
    """Seconds of the backward from the generated tensors into the method's own parameters alone."""
    with opdiff.materialize(unet):
        tensors = generated(unet)
        if not tensors:
            return 0.0
        grads = [torch.randn_like(t) * 1e-3 for t in tensors]
        t0 = clock()
        torch.autograd.backward(tensors, grads)
        seconds = clock() - t0
    optimizer.zero_grad(set_to_none=True)
    return seconds


def print_top_operators(prof, method: str, top: int, device: str) -> None:
    """The operators with the most self time in the profiled step (the part labels themselves left out)."""
    labels = {"adapter forward", "U-Net forward", "backward (U-Net + adapter)", "optimizer"}
    attribute = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if e.key not in labels), key=lambda e: -getattr(e, attribute))
    total = sum(getattr(e, attribute) for e in prof.key_averages())
    print(f"\n{method}: top {top} operators of one profiled step, by self time ({total / 1e3:.1f} ms in all)")
    for e in events[:top]:
        print(f"  {e.key[:44]:44} {getattr(e, attribute) / 1e3:10.1f} ms {e.count:7d} calls")


def profile_method(unet, method: str, inputs: dict, steps: int, device: str, top: int) -> dict[str, float]:
    opdiff.inject(unet, opdiff.AdapterConfig(method=method))
    opdiff.method_of(unet).at_largest(unet)  # MPOP/MPOR: after their selection
    unet.train()
    optimizer = adamw(opdiff.param_groups(unet, 1e-4), 1e-2)
    clock = Clock(device)
    runs = [step_parts(unet, optimizer, inputs, clock) for _ in range(steps + 1)][1:]
    backward_alone = statistics.median(adapter_backward(unet, optimizer, clock) for _ in range(steps))
    parts = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    total = sum(parts.values())
    parts["adapter backward"] = min(backward_alone, parts["backward"])
    parts["U-Net backward"] = parts.pop("backward") - parts["adapter backward"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step_parts(unet, optimizer, inputs, clock)
    print_top_operators(prof, method, top, device)
    opdiff.remove(unet)
    parts["step"] = total
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora,op-lora,lora-over-mpo", help="comma-separated methods "
                        "(default: lora,op-lora,lora-over-mpo)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (default 5)")
    parser.add_argument("--full-size", action="store_true", help="the full-size SDXL U-Net with random weights "
                        "(fp32, 10 GB) instead of the bundled tiny one")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: 64 tiny, 128 full-size)")
    parser.add_argument("--top", type=int, default=10, help="operators listed per method (default 10)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolution = args.resolution or (128 if args.full_size else 64)
    if args.full_size:
        unet = random_sdxl_unet(torch.float32, device)
        name = "full-size SDXL U-Net (random weights, fp32)"
    else:
        unet = UNet2DConditionModel.from_pretrained(TINY_UNET).to(device)
        name = "bundled tiny SDXL U-Net (fp32)"
    g = torch.Generator(device=device).manual_seed(0)
    side, cfg = resolution // 8, unet.config
    inputs = {
        "sample": torch.randn(1, 4, side, side, generator=g, device=device),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, 77, cfg.cross_attention_dim, generator=g, device=device),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                       generator=g, device=device),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device) * 1.0},
    }
    methods = args.methods.split(",")
    results = {m: profile_method(unet, m, inputs, args.steps, device, args.top) for m in methods}
    print(f"\n{name}, {device} ({torch.get_num_threads()} threads), {resolution} px, batch 1, r=4; seconds per part,"
          f" median of {args.steps} steps after 1 warm-up")
    print(f"{'method':16}" + "".join(f"{p:>17}" for p in PARTS) + f"{'step':>10}{'adapter %':>11}")
    for method, parts in results.items():
        adapter = parts["adapter forward"] + parts["adapter backward"] + parts["optimizer"]
        print(f"{method:16}" + "".join(f"{parts[p]:17.4f}" for p in PARTS) + f"{parts['step']:10.3f}"
              f"{100 * adapter / parts['step']:10.1f}%")
    print("adapter % = (adapter forward + adapter backward + optimizer) / step")


if __name__ == "__main__":
    main()
