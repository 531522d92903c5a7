"""The `opdiff` command: train, sample, export, CMMD scores, and a CPU demo that trains, samples and exports.

Every subcommand's flags come from its config dataclass (`TrainConfig`, `SampleConfig`, `ExportConfig`, ...), whose
settings are described once (`opdiff.settings`). The web GUI is `opdiff-app` (app.py), which builds on these
packages; they never import it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import torch

from metrics import ClipWeightsMissing
from opdiff.settings import Settings
from pipelines import presets
from pipelines.config import (
    BUNDLED_DATA,
    BUNDLED_MODEL,
    TrainConfig,
    add_arguments,
    add_settings,
    config_from_args,
    given,
)
from pipelines.interrupt import TrainingInterrupted
from pipelines.rundir import RunDir

# `opdiff demo`: the bundled model and images, sized to finish in well under two minutes on two CPU cores. The
# bundled model is pretrained on flat shapes; lr 1e-2 for 2 epochs (48 steps) gives the visible style shift
# (bench/RESULTS.md: the best demo CMMD of the lr sweep). The method is the default one.
DEMO_SETTINGS = {"epochs": 2, "lr": 1e-2, "sample_steps": 12, "sample_seeds": (0,)}


def _from_args(cls: type[Settings], args: argparse.Namespace) -> Settings:
    """The subcommand's config dataclass from its flags (defaults for what was not given)."""
    return cls.from_dict(given(args, cls.settings()))


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.train import train

    if args.dry_run:
        _dry_run(config_from_args(args))
        return
    run_dir = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:  # several processes (torchrun/accelerate): one report
        print(f"run folder: {run_dir}\n  LoRA for load_lora_weights: {RunDir(run_dir).lora}")


def _dry_run(cfg: TrainConfig) -> None:
    """Check the settings and print the memory estimate; load, write and train nothing."""
    from pipelines.logging_tb import check_logging
    from pipelines.memory import estimate_memory
    from pipelines.model import default_device
    from pipelines.optimizers import check_optimizer

    device = cfg.device or default_device()
    check_optimizer(cfg.optimizer, device)
    check_logging(cfg.log_with)
    estimate = estimate_memory(cfg)
    print(estimate.summary())
    if cfg.preset is not None and (budget := presets.load(cfg.preset).budget_gb) is not None:
        verdict = "fits" if estimate.fits(budget) else "does NOT fit"
        print(f"  {verdict} the {budget:g} GiB of preset {cfg.preset}")
    print(f"dry run: nothing trained; settings: {', '.join(f'{k}={v}' for k, v in cfg.to_dict().items())}")


def _cmd_sample(args: argparse.Namespace) -> None:
    from pipelines.sample import SampleConfig, default_grid_path, sample, save_grid

    cfg = _from_args(SampleConfig, args)
    print(f"grid: {save_grid(sample(cfg), default_grid_path(cfg))}")


def _cmd_export(args: argparse.Namespace) -> None:
    from pipelines.export import ExportConfig, describe, export_run

    logging.getLogger("pipelines.export").setLevel(logging.WARNING)  # what it would log is printed below
    files = export_run(_from_args(ExportConfig, args))
    print("\n".join(describe(path) for path in files.values()))


def _cmd_cmmd(args: argparse.Namespace) -> None:
    from pipelines.evaluate import (
        CmmdConfig,
        cmmd_dirs,
        count_images,
        load_embedder,
        small_sample_warning,
        trust_label,
    )

    cfg = _from_args(CmmdConfig, args)
    n_ref, n_gen = count_images(cfg.ref_dir), count_images(cfg.gen_dir)  # a wrong folder fails before CLIP loads
    embedder = load_embedder(cfg.clip)
    score = cmmd_dirs(cfg.ref_dir, cfg.gen_dir, embedder, cfg.cache_dir, cfg.clip.batch_size)
    print(f"CMMD: {score:.4f}\n  reference: {n_ref} images in {cfg.ref_dir}\n"
          f"  compared:  {n_gen} images in {cfg.gen_dir}\n  CLIP:      {embedder.model_name}")
    if label := trust_label(embedder):
        print(label)
    if warning := small_sample_warning(n_ref, n_gen):
        print(warning)


def _cmd_eval(args: argparse.Namespace) -> None:
    from pipelines.evaluate import IMAGES_DIR, EvalConfig, evaluate_run, load_embedder, trust_label

    cfg = _from_args(EvalConfig, args)
    embedder = load_embedder(cfg.clip)  # no weights: stop before generating
    result = evaluate_run(cfg, embedder)
    print(f"CMMD: {result['cmmd']:.4f}  ({result['n_images']} generated vs {result['n_reference']} training images, "
          f"{result['steps']} steps, CLIP {result['clip_model']})")
    if "base_cmmd" in result:
        print(f"base model CMMD: {result['base_cmmd']:.4f}")
    if label := trust_label(embedder):
        print(label)
    if "warning" in result:
        print(result["warning"])
    run = RunDir(cfg.run_dir)
    print(f"  scores: {run.cmmd}\n  images: {run.eval_dir / IMAGES_DIR}")


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from pipelines.reproduce import ReproduceConfig, reproduce

    table = reproduce(_from_args(ReproduceConfig, args))
    print(table.read_text(encoding="utf-8"))


def _cmd_demo(args: argparse.Namespace) -> None:
    from pipelines.sample import SampleConfig, sample, save_grid
    from pipelines.train import train

    cfg = config_from_args(args, **DEMO_SETTINGS)
    if (cfg.device or "cpu") == "cpu":
        # The tiny model's ops are too small for intra-op threads to pay off, and spinning threads stall
        # badly whenever another process holds a core; one thread is as fast alone and robust when shared.
        torch.set_num_threads(1)
    start = time.perf_counter()
    run_dir = train(cfg)
    trained = time.perf_counter()
    grid = save_grid(sample(SampleConfig(str(run_dir))), RunDir(run_dir).grid)
    print(
        f"demo finished in {time.perf_counter() - start:.0f} s (training {trained - start:.0f} s)\n"
        f"  run folder:       {run_dir}\n"
        f"  settings:         {RunDir(run_dir).config}\n"
        f"  loss curve:       {RunDir(run_dir).losses}\n"
        f"  base vs adapted:  {grid}\n"
        f"  LoRA (diffusers): {RunDir(run_dir).lora}  -> pipe.load_lora_weights(<this file>)"
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the `opdiff` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="opdiff",
        description="Personalize Stable Diffusion XL with over-parameterized low-rank adapters; ship a plain LoRA.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an adapter and export it as a LoRA",
                           description="Train an adapter on an image set; every setting is a flag or a --config key.")
    add_arguments(train)
    train.add_argument("--dry-run", action="store_true", help="check the settings and print the estimated peak "
                       "accelerator memory, then exit without loading the model or training")
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

    from pipelines.evaluate import CmmdConfig, EvalConfig
    from pipelines.export import ExportConfig
    from pipelines.reproduce import ReproduceConfig
    from pipelines.sample import SampleConfig

    commands: list[tuple[str, type[Settings], object, str, str]] = [
        ("sample", SampleConfig, _cmd_sample, "render base vs adapted images on the same noise",
         "Render a grid: rows = prompt x seed, columns = base | each LoRA."),
        ("export", ExportConfig, _cmd_export, "collapse a run's adapter and write a LoRA file per program",
         "Rebuild a run's adapter from adapter_training.safetensors, collapse it, and write LoRA files, each named "
         "for the programs that load it and saying so in its header: lora.safetensors for diffusers "
         "(pipe.load_lora_weights); for LoRA methods lora_kohya.safetensors for ComfyUI, AUTOMATIC1111/Forge, "
         "sd-scripts and diffusers; for DoRA methods lora_lycoris (LyCORIS, sd-scripts with LyCORIS), lora_comfyui "
         "(ComfyUI and Forge) and lora_a1111 (AUTOMATIC1111 and loaders without DoRA: a plain LoRA approximating "
         "the DoRA, its error printed and stored). The run's settings (paths reduced to names), steps and CMMD (if "
         "`opdiff eval` measured it) go into the headers."),
        ("cmmd", CmmdConfig, _cmd_cmmd, "CMMD between two image folders",
         "CMMD (CLIP maximum mean discrepancy, x1000; lower is closer) between the images directly in two "
         "folders, with CLIP ViT-L/14 at 336 px."),
        ("eval", EvalConfig, _cmd_eval, "score a run: one image per training caption, CMMD vs the training images",
         "Generate one image per training caption with the run's LoRA loaded into its base model (caption i from "
         "seed SEED + i), then compute CMMD against the training images; writes <run folder>/cmmd.json and the "
         "images under <run folder>/eval/."),
        ("reproduce", ReproduceConfig, _cmd_reproduce, "the papers' protocol: train each method, CMMD table, grid",
         "For each method: train with the recipe's settings, generate one image per training caption, score CMMD "
         "against the training images; write table.md, table.csv and samples.png. Finished runs and scores are "
         "reused (resumable per method)."),
    ]
    for name, cls, run, short, description in commands:
        command = sub.add_parser(name, help=short, description=description)
        add_settings(command, cls.settings())
        command.set_defaults(run=run)
    return parser


EXIT_USAGE = 2
"""Exit status of a user error (a bad setting, file or folder): one line on stderr says what and what to do."""


def main(argv: list[str] | None = None) -> int:
    """Run the `opdiff` command line; return the exit status.

    0: done. 2: a user error or a file-system failure, explained in one line. 130 / 143: stopped by SIGINT /
    SIGTERM (128 + the signal's number) before the planned steps, after saving what could be saved.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag that argparse has already explained
        return int(e.code or 0)
    try:
        args.run(args)
    except TrainingInterrupted as e:  # the run saved what it could; say how to continue (once for all processes)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"opdiff {args.command}: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # Ctrl-C before training started (loading, encoding) or in another command
        print(f"opdiff {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, OSError, FloatingPointError, ClipWeightsMissing) as e:  # user errors: no traceback
        print(f"opdiff {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
