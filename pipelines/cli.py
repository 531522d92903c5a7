"""The `opdiff` command: train, sample, export, CMMD scores, and a CPU demo that trains, samples and exports."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from metrics import ClipWeightsMissing
from pipelines.config import BUNDLED_DATA, BUNDLED_MODEL, REPO_ROOT, add_arguments, config_from_args
from pipelines.export import ALL_FORMATS, DEFAULT_SVD_RANK

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                 "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# `opdiff demo`: the bundled model and images, sized to finish in well under two minutes on two CPU cores. The
# bundled model is pretrained on flat shapes; lr 1e-2 for 2 epochs (48 steps) gives the visible style shift
# (bench/RESULTS.md: the best demo CMMD of the lr sweep).
DEMO_SETTINGS = {"method": "lora", "epochs": 2, "lr": 1e-2, "sample_steps": 12, "sample_seeds": (0,)}


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.train import train

    run_dir = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:  # several processes (torchrun/accelerate): one report
        print(f"run folder: {run_dir}\n  LoRA for load_lora_weights: {run_dir / 'lora.safetensors'}")


def _cmd_sample(args: argparse.Namespace) -> None:
    from pipelines.sample import sample

    grid = sample(args.source, args.prompt, args.seed, args.out, args.lora, args.steps, args.guidance_scale)
    print(f"grid: {grid}")


def _cmd_export(args: argparse.Namespace) -> None:
    from pipelines.export import describe, export

    logging.getLogger("pipelines.export").setLevel(logging.WARNING)  # what it would log is printed below
    files = export(args.run_dir, args.out, EXPORT_DTYPES[args.dtype], format=args.format, svd_rank=args.svd_rank)
    print("\n".join(describe(path) for path in files.values()))


def _add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags that choose the CLIP model CMMD is computed with."""
    parser.add_argument("--clip-checkpoint", type=Path, default=None, metavar="PATH",
                        help="CLIP weights file (open_clip_model.safetensors of ViT-L-14-336-quickgelu, or OpenAI's "
                        "ViT-L-14-336px.pt) (default: the open_clip / Hugging Face cache)")
    parser.add_argument("--clip-model", default=None, metavar="NAME",
                        help="open_clip model name (default: ViT-L-14-336-quickgelu, the CMMD reference); "
                        "'tiny-random' is a tiny CLIP with random weights for tests, its scores mean nothing")
    parser.add_argument("--batch-size", type=int, default=16, help="images per CLIP forward pass (default: 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def _cmd_cmmd(args: argparse.Namespace) -> None:
    from pipelines.evaluate import cmmd_dirs, count_images, load_embedder, trust_label

    n_ref, n_gen = count_images(args.ref_dir), count_images(args.gen_dir)  # a wrong folder fails before CLIP loads
    embedder = load_embedder(args.clip_model, args.clip_checkpoint, args.device)
    score = cmmd_dirs(args.ref_dir, args.gen_dir, embedder, args.cache_dir, args.batch_size)
    print(f"CMMD: {score:.4f}\n  reference: {n_ref} images in {args.ref_dir}\n"
          f"  compared:  {n_gen} images in {args.gen_dir}\n  CLIP:      {embedder.model_name}")
    if label := trust_label(embedder):
        print(label)


def _cmd_eval(args: argparse.Namespace) -> None:
    from pipelines.evaluate import CMMD_FILE, evaluate_run, load_embedder, trust_label

    embedder = load_embedder(args.clip_model, args.clip_checkpoint, args.device)  # no weights: stop before generating
    result = evaluate_run(args.run_dir, embedder, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                          limit=args.limit, base_too=args.base_too, batch_size=args.batch_size, device=args.device)
    print(f"CMMD: {result['cmmd']:.4f}  ({result['n_images']} generated vs {result['n_reference']} training images, "
          f"{result['steps']} steps, CLIP {result['clip_model']})")
    if "base_cmmd" in result:
        print(f"base model CMMD: {result['base_cmmd']:.4f}")
    if label := trust_label(embedder):
        print(label)
    print(f"  scores: {args.run_dir / CMMD_FILE}\n  images: {args.run_dir / 'eval'}")


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from pipelines.reproduce import reproduce

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)  # numbers, true/false/null, lists
        except json.JSONDecodeError:
            overrides[key] = value  # a plain string, e.g. a path
    table = reproduce(args.recipe, args.methods.split(","), args.output_dir, overrides, args.data,
                      args.clip_model, args.clip_checkpoint, args.eval_steps, args.eval_limit)
    print(table.read_text(encoding="utf-8"))


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


def _cmd_app(args: argparse.Namespace) -> None:
    import importlib.util

    # app.py sits beside the packages in a source checkout and imports them; they never import it.
    app_file = REPO_ROOT / "app.py"
    if not app_file.is_file():
        raise FileNotFoundError(f"opdiff app runs {app_file}, which comes with a source checkout of opdiff")
    spec = importlib.util.spec_from_file_location("opdiff_app", app_file)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    app.main(args.app_args, prog="opdiff app")


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

    export = sub.add_parser("export", help="collapse a run's adapter and write a LoRA file per program",
                            formatter_class=fmt,
                            description="Rebuild a run's adapter from adapter_training.safetensors, collapse it, "
                            "and write LoRA files, each named for the programs that load it and saying so in its "
                            "header: lora.safetensors for diffusers (pipe.load_lora_weights); for LoRA methods "
                            "lora_kohya.safetensors for ComfyUI, AUTOMATIC1111/Forge, sd-scripts and diffusers; for "
                            "DoRA methods lora_lycoris (LyCORIS, sd-scripts with LyCORIS), lora_comfyui (ComfyUI "
                            "and Forge) and lora_a1111 (AUTOMATIC1111 and loaders without DoRA: a plain LoRA "
                            "approximating the DoRA, its error printed and stored). The run's settings (paths "
                            "reduced to names), steps and CMMD (if `opdiff eval` measured it) go into the headers.")
    export.add_argument("run_dir", type=Path, help="a run folder written by `opdiff train`")
    export.add_argument("--format", choices=list(ALL_FORMATS), default="both",
                        help="which files: `both` every file the method needs, `kohya` its kohya-keyed ones, or "
                        "one by name (lycoris, comfyui, a1111: DoRA methods only); several files are named "
                        "<name>_<format>.safetensors beside the diffusers one")
    export.add_argument("--out", type=Path, default=None,
                        help="output file (default: <run folder>/lora.safetensors, lora-fp16/-bf16.safetensors in "
                        "half precision)")
    export.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="fp32", help="tensor dtype in the file")
    export.add_argument("--svd-rank", type=int, default=None, metavar="R",
                        help="rank of the a1111 file of a DoRA run, which approximates the DoRA update by truncated "
                        f"SVD: higher is closer and larger (default: {DEFAULT_SVD_RANK}, at least twice the "
                        "adapter's rank)")
    export.set_defaults(run=_cmd_export)

    cmmd = sub.add_parser("cmmd", help="CMMD between two image folders",
                          description="CMMD (CLIP maximum mean discrepancy, x1000; lower is closer) between the "
                          "images directly in two folders, with CLIP ViT-L/14 at 336 px.")
    cmmd.add_argument("ref_dir", type=Path, help="folder of reference images (e.g. the training images)")
    cmmd.add_argument("gen_dir", type=Path, help="folder of images to compare (e.g. generated ones)")
    _add_clip_arguments(cmmd)
    cmmd.add_argument("--cache-dir", type=Path, default=None,
                      help="store each folder's CLIP embeddings here and reuse them while its files are unchanged")
    cmmd.set_defaults(run=_cmd_cmmd)

    evaluate = sub.add_parser("eval", help="score a run: one image per training caption, CMMD vs the training images",
                              description="Generate one image per training caption with the run's LoRA loaded into "
                              "its base model (caption i from seed SEED + i), then compute CMMD against the training "
                              "images; writes <run folder>/cmmd.json and the images under <run folder>/eval/.")
    evaluate.add_argument("run_dir", type=Path, help="a run folder written by `opdiff train`")
    _add_clip_arguments(evaluate)
    evaluate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's sample_steps)")
    evaluate.add_argument("--guidance-scale", type=float, default=None,
                          help="classifier-free guidance (default: the run's guidance_scale)")
    evaluate.add_argument("--seed", type=int, default=0, help="caption i is generated from seed SEED + i (default: 0)")
    evaluate.add_argument("--limit", type=int, default=None,
                          help="generate for the first N captions only (default: all)")
    evaluate.add_argument("--base-too", action="store_true",
                          help="also score the base model without the LoRA, on the same captions and seeds")
    evaluate.set_defaults(run=_cmd_eval)

    repro = sub.add_parser("reproduce", help="the papers' protocol: train each method, CMMD table, grid",
                           description="For each method: train with the recipe's settings, generate one image per "
                           "training caption, score CMMD against the training images; write table.md, table.csv "
                           "and samples.png. Finished runs and scores are reused (resumable per method).")
    repro.add_argument("--recipe", required=True, help="recipes/<name>.toml (naruto, monet) or a .toml file")
    repro.add_argument("--methods", default="lora,op-lora,dora,op-dora", help="comma-separated methods")
    repro.add_argument("--output-dir", type=Path, required=True, help="one sub-folder per method, tables beside them")
    repro.add_argument("--data", default=None,
                       help="replace the recipe's source: a local parquet/arrow copy, hf:<id>, or an image folder")
    repro.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="override recipe training settings, e.g. --set base=path/to/sdxl max_steps=100")
    repro.add_argument("--eval-steps", type=int, default=None, help="denoising steps per evaluation image")
    repro.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N captions")
    _add_clip_arguments(repro)
    repro.set_defaults(run=_cmd_reproduce)

    # The flags belong to app.py (`opdiff app --help` lists them); "+" as the prefix passes "--flag"s through.
    app = sub.add_parser("app", help="start the web GUI: upload, train, compare, evaluate, export (app.py)",
                         add_help=False, prefix_chars="+")
    app.add_argument("app_args", nargs="*", help="app.py's flags: --host, --port, --output-dir, --max-upload-mb")
    app.set_defaults(run=_cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `opdiff` command line; return the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FloatingPointError, ClipWeightsMissing) as e:  # user errors: no traceback
        print(f"opdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
