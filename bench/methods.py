"""Trainable parameters and step time per adapter method, as ratios to `lora`.

1. Full-size SDXL U-Net (its config from assets/, built on the meta device: no weights, no memory): trainable
   parameters per method, and the parameters each adds over plain A and B (for LoRA-Over this is N_add of
   lora-over.txt Eq. 6 summed over every MPO matrix).
2. The bundled tiny SDXL U-Net on this machine's CPU: time of one training step (forward + backward + AdamW at
   64 px, batch 1) per method. Methods are timed in interleaved rounds so machine noise hits them alike; the
   median per method is divided by lora's median from the same run.
3. With --full-size: the full-size SDXL U-Net with random weights (about 10 GB in fp32) at a reduced resolution
   on this machine's device, every method on one shared base (each its own module tree over the same weights),
   timed in interleaved rounds; the ratio is each method's median over lora's.
4. With --full-memory: the same U-Net, each method in a fresh process (so peak memory is the method's alone),
   with a lora run before and after every method; the time ratio is over the mean of those two lora runs. Peak memory is shown next to what the method's own parameters, gradients and AdamW state take
   (glibc's mmap threshold fixed at 1 MiB, so the figure is live memory, not heap fragmentation).

    python bench/methods.py [--steps 30] [--methods lora,op-lora] [--full-size] [--full-memory]
                            [--full-res 256 --full-steps 2] [--skip-tiny]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from train_step import peak_memory, random_sdxl_unet  # bench/ is on sys.path when run as a script

import opdiff
from pipelines.step import adamw

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SDXL_CONFIG = ASSETS / "sdxl-base-1.0" / "unet" / "config.json"
TINY_UNET = ASSETS / "tiny-sdxl" / "unet"


def count_full_size(methods: list[str]) -> list[dict]:
    """Trainable parameters of each method on the full SDXL U-Net (meta device)."""
    config = json.loads(SDXL_CONFIG.read_text())
    rows = []
    for method in methods:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        opdiff.inject(unet, opdiff.AdapterConfig(method=method))
        opdiff.method_of(unet).at_largest(unet)  # MPOP/MPOR: after their selection
        layers = opdiff.adapted_layers(unet)
        plain = sum(a.lora_A.weight.numel() + a.lora_B.weight.numel() for a in layers)
        trainable = sum(p.numel() for p in opdiff.trainable_parameters(unet))
        rows.append({"method": method, "layers": len(layers), "trainable": trainable, "n_add": trainable - plain})
    return rows


def time_steps(methods: list[str], steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per training step of each method on the bundled U-Net, interleaved round by round."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    runs = {}
    for method in methods:
        unet = UNet2DConditionModel.from_pretrained(TINY_UNET, torch_dtype=torch.float32)
        opdiff.inject(unet, opdiff.AdapterConfig(method=method))
        opdiff.method_of(unet).at_largest(unet)  # MPOP/MPOR: after their selection
        unet.train()
        runs[method] = (unet, adamw(opdiff.param_groups(unet, lr=1e-4), 1e-2))
    cfg = next(iter(runs.values()))[0].config
    latents = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(warmup + steps):
        for method, (unet, opt) in runs.items():
            t0 = time.perf_counter()
            with opdiff.materialize(unet):
                out = unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=cond).sample
                out.square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times[method].append(time.perf_counter() - t0)
    return times


def full_size_inputs(resolution: int, device: str) -> dict:
    """Random latents, prompt embeddings and conditioning for one full-size SDXL step at `resolution`, batch 1."""
    g = torch.Generator(device=device).manual_seed(0)
    side = resolution // 8
    return {"sample": torch.randn(1, 4, side, side, generator=g, device=device), "timestep": 500,
            "encoder_hidden_states": torch.randn(1, 77, 2048, generator=g, device=device),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, generator=g, device=device),
                                  "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                                           device=device) * 1.0}}


def timed_step(unet: torch.nn.Module, opt: torch.optim.Optimizer, inputs: dict, device: str) -> float:
    """Seconds of one training step: adapters generated once, forward, backward, AdamW."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with opdiff.materialize(unet):
        unet(**inputs).sample.float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def full_size_one(method: str, steps: int, resolution: int, device: str) -> dict:
    """In this (fresh) process: build the full-size U-Net, then time `method`'s steps and measure its peak memory.

    Peak memory is measured from just after the base and its inputs exist, so it holds the method's parameters,
    gradients, AdamW state, generated tensors and the step's activations, and nothing a previous method left.
    """
    unet = random_sdxl_unet(torch.float32, device)
    unet.train()
    inputs = full_size_inputs(resolution, device)
    with peak_memory(device) as memory:
        opdiff.inject(unet, opdiff.AdapterConfig(method=method))
        opdiff.method_of(unet).at_largest(unet)  # MPOP/MPOR: after their selection
        trainable = sum(p.numel() for p in opdiff.trainable_parameters(unet))
        opt = adamw(opdiff.param_groups(unet, lr=1e-4), 1e-2)
        times = []
        for i in range(steps + 1):  # the first step warms up allocators and kernels
            seconds = timed_step(unet, opt, inputs, device)
            if i > 0:
                times.append(seconds)
    return {"method": method, "s_step": statistics.median(times), "peak_mb": memory["peak_mb"],
            "trainable": trainable}


def time_full_size_interleaved(methods: list[str], steps: int, resolution: int, device: str) -> dict[str, list[float]]:
    """Seconds per step of every method on one full-size base, interleaved step by step.

    Each method gets its own module tree over the same base weights (a deep copy that shares every base tensor),
    so one 10 GB base serves all of them and each round times every method within seconds of the others: drift
    of a shared machine hits all methods alike.
    """
    base = random_sdxl_unet(torch.float32, device)
    inputs = full_size_inputs(resolution, device)
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    runs = {}
    for method in methods:
        unet = copy.deepcopy(base, memo=dict(shared))  # new modules, the same base tensors
        torch.manual_seed(0)
        opdiff.inject(unet, opdiff.AdapterConfig(method=method))
        opdiff.method_of(unet).at_largest(unet)  # MPOP/MPOR: after their selection
        runs[method] = (unet.train(), adamw(opdiff.param_groups(unet, lr=1e-4), 1e-2))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(steps + 1):  # round 0 warms up allocators and kernels
        for method, (unet, opt) in runs.items():
            seconds = timed_step(unet, opt, inputs, device)
            if i > 0:
                times[method].append(seconds)
        print(f"  round {i}: " + ", ".join(f"{m} {t[-1]:.2f}" for m, t in times.items() if i > 0), flush=True)
    return times


def time_full_size(methods: list[str], steps: int, resolution: int) -> list[dict]:
    """Each method in a fresh process, with a lora run before and after it: the method's time is divided by the
    mean of its two neighbouring lora runs, so a machine that drifts during the run moves both sides alike."""
    order = ["lora"]
    for method in methods:
        if method != "lora":
            order += [method, "lora"]
    # glibc's default malloc raises its mmap threshold after the first large free, then keeps freed per-layer
    # temporaries in a fragmented heap: peak RSS then measures the allocator, not the method (DoRA: 6 GB vs 1 GB
    # live). A fixed threshold returns large blocks to the system at once, as a GPU's caching allocator would
    # reuse them. Set MALLOC_MMAP_THRESHOLD_ yourself to override.
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**20), **os.environ}
    runs = []
    for method in order:
        out = subprocess.run([sys.executable, __file__, "--full-one", method, "--full-res", str(resolution),
                              "--full-steps", str(steps)], capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"{method} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {method:16} {runs[-1]['s_step']:8.3f} s/step  peak {runs[-1]['peak_mb']:7.0f} MB", flush=True)
    for i in range(1, len(runs), 2):
        runs[i]["lora_s_step"] = (runs[i - 1]["s_step"] + runs[i + 1]["s_step"]) / 2
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(opdiff.METHODS), help="comma-separated methods (default: all)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first (default 3)")
    parser.add_argument("--full-size", action="store_true", help="also time the full-size SDXL U-Net (random weights), "
                        "every method on one shared base, interleaved")
    parser.add_argument("--full-memory", action="store_true", help="also measure each method's peak memory on the "
                        "full-size U-Net, one fresh process per method (and its time, less reliably)")
    parser.add_argument("--full-res", type=int, default=256, help="image size for --full-size (default 256)")
    parser.add_argument("--full-steps", type=int, default=2, help="timed steps per method for --full-size (default 2)")
    parser.add_argument("--skip-tiny", action="store_true", help="skip the bundled-model timing")
    parser.add_argument("--full-one", metavar="METHOD", help=argparse.SUPPRESS)  # --full-size's subprocesses
    args = parser.parse_args()
    if args.full_one:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(json.dumps(full_size_one(args.full_one, args.full_steps, args.full_res, device)))
        return
    methods = args.methods.split(",")
    if "lora" not in methods:
        methods.insert(0, "lora")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print(f"Full-size SDXL U-Net ({SDXL_CONFIG.name}, meta device), r=4, alpha=4, targets to_q,to_k,to_v,to_out.0;"
          f" MPO m={opdiff.AdapterConfig().mpo_cores}, MPOP/MPOR after selecting {opdiff.AdapterConfig().select_fraction:.0%} of each group"
          " per group")
    rows = count_full_size(methods)
    lora_params = next(r["trainable"] for r in rows if r["method"] == "lora")
    print(f"{'method':16} {'layers':>6} {'trainable':>13} {'x lora':>8} {'added (Eq. 6)':>14}")
    for r in rows:
        print(f"{r['method']:16} {r['layers']:6d} {r['trainable']:13,d} {r['trainable'] / lora_params:8.2f}"
              f" {r['n_add']:14,d}")

    if not args.skip_tiny:
        print_tiny(methods, args)
    if args.full_size:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"\nFull-size SDXL U-Net, random weights, fp32, {device}, {args.full_res} px, batch 1, every method on"
              f" one shared base, interleaved step by step; median of {args.full_steps} rounds after 1 warm-up")
        times = time_full_size_interleaved(methods, args.full_steps, args.full_res, device)
        base = statistics.median(times["lora"])
        print(f"{'method':16} {'s/step':>9} {'x lora':>8}  steps")
        for method, t in times.items():
            med = statistics.median(t)
            print(f"{method:16} {med:9.3f} {med / base:8.3f}  {', '.join(f'{x:.2f}' for x in t)}")
    if args.full_memory:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"\nFull-size SDXL U-Net, random weights, fp32, {device}, {args.full_res} px, batch 1, median of"
              f" {args.full_steps} steps after 1 warm-up; each run a fresh process, lora between every two methods")
        runs = time_full_size(methods, args.full_steps, args.full_res)
        loras = [r for r in runs if r["method"] == "lora"]
        lora_mb = statistics.median(r["peak_mb"] for r in loras)
        lora_params = loras[0]["trainable"]
        drift = ", ".join(f"{r['s_step']:.3f}" for r in loras)
        print(f"lora runs: {drift} s/step (the machine's drift)")
        print(f"{'method':16} {'s/step':>9} {'x lora':>8} {'peak MB':>9} {'- lora MB':>10} {'16 B x added':>13}")
        for r in runs[1::2]:
            # 16 bytes per added trainable parameter: the parameter, its gradient and AdamW's two moments (fp32)
            own = 16 * (r["trainable"] - lora_params) / 2**20
            print(f"{r['method']:16} {r['s_step']:9.3f} {r['s_step'] / r['lora_s_step']:8.3f} {r['peak_mb']:9.0f}"
                  f" {r['peak_mb'] - lora_mb:10.0f} {own:13.0f}")
        print("x lora: over the mean of the lora runs just before and after; peak MB: peak resident memory above")
        print("the built base; - lora MB: over lora's (median); 16 B x added: what the method's own parameters")
        print("over lora's take with their gradients and AdamW state")

def print_tiny(methods: list[str], args: argparse.Namespace) -> None:
    print(f"\nBundled tiny SDXL U-Net, CPU ({torch.get_num_threads()} threads), 64 px, batch 1,"
          f" median of {args.steps} steps after {args.warmup} warm-up, interleaved")
    times = time_steps(methods, args.steps, args.warmup)
    base = statistics.median(times["lora"])
    print(f"{'method':16} {'s/step':>9} {'x lora':>8}")
    for method in methods:
        med = statistics.median(times[method])
        print(f"{method:16} {med:9.4f} {med / base:8.2f}")


if __name__ == "__main__":
    main()
