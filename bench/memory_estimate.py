"""How far the memory estimate (`pipelines.memory`) is from a measured peak, and what each preset is estimated at.

    python bench/memory_estimate.py [--resolution 512] [--presets]

Measured: the full-size SDXL U-Net (assets/sdxl-base-1.0, random weights, float32) with the adapter injected, one
training step (forward, backward, AdamW step) on the CPU in a fresh process per setting, with glibc's mmap
threshold fixed at 1 MiB so that freed memory returns to the system. The step's memory is the peak resident memory
during the step (VmHWM, reset before it) minus the resident memory before it, which already holds the weights and
the adapter. Estimated: the same settings' training phase minus weights and adapter, from `estimate_memory`.
`--presets` prints every preset's estimate against its budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GiB = 2**30


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(settings: dict) -> dict:
    """One training step of the full-size U-Net on the CPU (run in a fresh process); its memory in bytes."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    import opdiff
    from pipelines.config import TrainConfig
    from pipelines.encoding import Encoded
    from pipelines.memory import _unet_inputs
    from pipelines.optimizers import build_optimizer
    from pipelines.step import Trainer

    torch.set_num_threads(2)
    cfg = TrainConfig(**settings)
    config = UNet2DConditionModel.load_config(REPO / "assets" / "sdxl-base-1.0" / "unet")
    unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(False)
    opdiff.inject(unet, cfg.adapter)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = build_optimizer(cfg.optimizer, opdiff.param_groups(unet, cfg.lr), cfg.weight_decay)
    side = cfg.resolution // 8
    latents, _, kwargs = _unet_inputs(config, (cfg.batch_size, 4, side, side), torch.float32)
    batch = Encoded(latents, kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]["text_embeds"],
                    kwargs["added_cond_kwargs"]["time_ids"])
    trainer = Trainer(unet, optimizer, DDPMScheduler())
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    trainer.step(1, batch, torch.randn_like(latents), torch.tensor([500] * cfg.batch_size))
    return {"step_bytes": _rss("VmHWM") - before, "resident_before": before}


def estimate(settings: dict) -> dict:
    from pipelines.config import TrainConfig
    from pipelines.memory import estimate_memory

    e = estimate_memory(TrainConfig(**settings), configs=REPO / "assets" / "sdxl-base-1.0")
    parts = e.train_parts
    return {"step_bytes": e.phases["train"] - parts["weights"] - parts["adapter"], "parts": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--presets", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: JSON settings
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    if args.presets:
        from pipelines import presets
        from pipelines.config import TrainConfig
        from pipelines.memory import estimate_memory

        for name in presets.names():
            preset = presets.load(name)
            if preset.budget_gb is not None:
                e = estimate_memory(TrainConfig(preset=name))
                print(f"{name}: {e.total / GiB:.2f} GiB of {preset.budget_gb:g} "
                      f"({', '.join(f'{k} {v / GiB:.2f}' for k, v in e.phases.items())})", flush=True)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "OMP_NUM_THREADS": "2"}
    print(f"full-size SDXL U-Net, float32, CPU, batch 1, {args.resolution} px: memory a training step adds")
    print(f"{'settings':44} {'measured GiB':>12} {'estimate GiB':>12} {'est/meas':>8}")
    for method, checkpointing in (("lora", False), ("lora", True), ("op-lora", True)):
        settings = {"method": method, "resolution": args.resolution, "gradient_checkpointing": checkpointing}
        out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(settings)], env=env, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        measured = json.loads(out)["step_bytes"]
        estimated = estimate(settings)["step_bytes"]
        label = f"{method}, checkpointing {'on' if checkpointing else 'off'}"
        print(f"{label:44} {measured / GiB:12.3f} {estimated / GiB:12.3f} {estimated / measured:8.2f}", flush=True)


if __name__ == "__main__":
    main()
