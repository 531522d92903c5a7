"""The `opdiff` command: train, sample, export, and a CPU demo that does all three on the bundled model."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from pipelines.config import BUNDLED_DATA, BUNDLED_MODEL, add_arguments, config_from_args

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# `opdiff demo`: the bundled model and images, sized to finish in well under two minutes on two CPU cores. The
# bundled model's weights are random, so nothing real is learned; a large step makes the adapter's effect visible
# in the grid after 48 steps.
DEMO_SETTINGS = {"method": "lora", "epochs": 2, "lr": 1e-2, "sample_steps": 12, "sample_seeds": (0,)}


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.train import train

    run_dir = train(config_from_args(args))
    print(f"run folder: {run_dir}\n  LoRA for load_lora_weights: {run_dir / 'lora.safetensors'}")


def _cmd_sample(args: argparse.Namespace) -> None:
    from pipelines.sample import sample

    grid = sample(args.source, args.prompt, args.seed, args.out, args.lora, args.steps, args.guidance_scale)
    print(f"grid: {grid}")


def _cmd_export(args: argparse.Namespace) -> None:
    from pipelines.export import export

    out = args.out or args.run_dir / f"lora-{args.dtype}.safetensors"
    print(f"LoRA: {export(args.run_dir, out, EXPORT_DTYPES[args.dtype])}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from pipelines.sample import sample
    from pipelines.train import train

    cfg = config_from_args(args, **DEMO_SETTINGS)
    if (cfg.device or "cpu") == "cpu":
        # The tiny model's ops are too small for intra-op threads to pay off, and spinning threads stall
        # badly whenever another process holds a core; one thread is as fast alone and robust when shared.
        torch.set_num_threads(1)
    start = time.perf_counter()
    run_dir = train(cfg)
    trained = time.perf_counter()
    grid = sample(run_dir)
    print(
        f"demo finished in {time.perf_counter() - start:.0f} s (training {trained - start:.0f} s)\n"
        f"  run folder:       {run_dir}\n"
        f"  settings:         {run_dir / 'config.json'}\n"
        f"  loss curve:       {run_dir / 'losses.csv'}\n"
        f"  base vs adapted:  {grid}\n"
        f"  LoRA (diffusers): {run_dir / 'lora.safetensors'}  -> pipe.load_lora_weights(<this file>)"
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the `opdiff` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="opdiff",
        description="Personalize Stable Diffusion XL with over-parameterized low-rank adapters; ship a plain LoRA.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    train = sub.add_parser("train", help="train an adapter and export it as a LoRA",
                           description="Train an adapter on an image set; every setting is a flag or a --config key.")
    add_arguments(train)
    train.set_defaults(run=_cmd_train)

    demo = sub.add_parser(
        "demo",
        help="train, sample and export on the bundled tiny model (CPU, about a minute)",
        description=f"Train a LoRA on the bundled tiny SDXL ({BUNDLED_MODEL.name}) and demo images "
        f"({BUNDLED_DATA.name}), render base vs adapted samples, and export. Settings here override the demo's "
        f"own ({', '.join(f'{k}={v}' for k, v in DEMO_SETTINGS.items())}).",
    )
    add_arguments(demo)
    demo.set_defaults(run=_cmd_demo)

    sample = sub.add_parser("sample", help="render base vs adapted images on the same noise", formatter_class=fmt,
                            description="Render a grid: rows = prompt x seed, columns = base | each LoRA.")
    sample.add_argument("source", help="a run folder (uses its base, LoRA and sample settings) or a base model")
    sample.add_argument("--lora", nargs="*", default=[], metavar="FILE",
                        help="LoRA files to compare against the base (default: the run folder's lora.safetensors)")
    sample.add_argument("--prompt", nargs="*", default=None, help="prompts (default: the run's sample prompts)")
    sample.add_argument("--seed", nargs="*", type=int, default=None, help="seeds (default: the run's sample seeds)")
    sample.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's sample_steps)")
    sample.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the run's guidance_scale)")
    sample.add_argument("--out", type=Path, default=None,
                        help="grid PNG path (default: <run folder>/samples.png, or ./samples.png for a base model)")
    sample.set_defaults(run=_cmd_sample)

    export = sub.add_parser("export", help="collapse a run's adapter and write a diffusers LoRA file",
                            formatter_class=fmt,
                            description="Rebuild a run's adapter from adapter_training.safetensors, collapse it, "
                            "and write the LoRA that StableDiffusionXLPipeline.load_lora_weights reads.")
    export.add_argument("run_dir", type=Path, help="a run folder written by `opdiff train`")
    export.add_argument("--out", type=Path, default=None,
                        help="output file (default: <run folder>/lora-<dtype>.safetensors)")
    export.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="float32", help="tensor dtype in the file")
    export.set_defaults(run=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `opdiff` command line; return the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # user errors: one clear line, no traceback
        print(f"opdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
