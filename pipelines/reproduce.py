"""`opdiff reproduce`: the papers' SDXL protocol in one command (op-lora.txt Sec. 4.1, Table 1).

For each method: train with the recipe's settings, generate one image per training caption with fixed seeds, score
CMMD against the training images, and collect a table like the paper's Table 1 (Markdown + CSV) plus one grid with
every method side by side. Resumable per method: a finished run or score is reused, not recomputed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from opdiff.settings import Settings, option
from pipelines.config import TrainConfig
from pipelines.evaluate import ClipOptions, EvalConfig, evaluate_run, load_embedder, trust_label
from pipelines.hf_data import HFSource, is_hf_source, materialize
from pipelines.rundir import RunDir
from pipelines.sample import SampleConfig, sample, save_grid
from pipelines.train import train

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
CMMD_VARIANT = ("CLIP ViT-L/14-336 image embeddings L2-normalized before the RBF kernel (sigma 10), biased MMD^2 x 1000:"
                " the reference implementation's (google-research/cmmd) variant")


def recipe_path(recipe: str | Path) -> Path:
    """Return the recipe file: a path, or a name in recipes/ (`naruto`, `monet`)."""
    path = Path(recipe)
    if path.suffix == ".toml" and path.exists():
        return path
    named = RECIPES_DIR / f"{recipe}.toml"
    if named.exists():
        return named
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise ValueError(f"unknown recipe {str(recipe)!r}: give a .toml file or one of: {known}")


def load_recipe(recipe: str | Path) -> tuple[HFSource, dict, list[str]]:
    """Return (where the data comes from, the training settings, the methods it compares) of a recipe file."""
    spec = tomllib.loads(recipe_path(recipe).read_text(encoding="utf-8"))
    data = dict(spec.get("data", {}))
    if "caption_template" in data:
        data.setdefault("caption_column", None)
    data["filter"] = tuple(tuple(f) for f in data.get("filter", ()))
    unknown = set(data) - {f.name for f in fields(HFSource)}
    if unknown:
        raise ValueError(f"recipe {recipe}: unknown [data] setting(s): {', '.join(sorted(unknown))}")
    train = dict(spec.get("train", {}))
    TrainConfig.from_dict(train, source=str(recipe))  # fail now, naming bad keys, not after hours of training
    return HFSource(**data), train, list(spec.get("methods", []))


def _parse_set(items: tuple[str, ...]) -> dict:
    """`KEY=VALUE` overrides: VALUE read as JSON (numbers, true/false/null, lists), else as a plain string."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a plain string, e.g. a path
    return overrides


@dataclass
class ReproduceConfig(Settings):
    """`opdiff reproduce`: train every method of a recipe, score CMMD, write the table and a grid."""

    recipe: str = option(help="recipes/<name>.toml (naruto, monet) or a .toml file.", group="run")
    output_dir: Path = option(help="One sub-folder per method, the tables beside them.", group="run",
                              label="output folder")
    methods: tuple[str, ...] = option((), "Methods to train and score.", group="basic",
                                      none_means="the recipe's methods")
    data: str | None = option(None, "Replace the recipe's source: a local parquet/arrow copy, hf:<id>, or an image "
                              "folder.", group="basic", none_means="the recipe's source")
    set: tuple[str, ...] = option((), "Override recipe training settings, e.g. --set base=path/to/sdxl "
                                  "max_steps=100.", group="basic", label="KEY=VALUE")
    eval_steps: int | None = option(None, "Denoising steps per evaluation image.", minimum=1,
                                    none_means="the run's sample_steps")
    eval_limit: int | None = option(None, "Evaluate only the first N captions.", minimum=1, none_means="all")
    clip: ClipOptions = field(default_factory=ClipOptions)


def reproduce(cfg: ReproduceConfig) -> Path:
    """Train, generate and score every method; return the Markdown table's path (a CSV and a grid lie beside it).

    `cfg.set` replaces recipe settings (e.g. a local `base`, fewer `max_steps`); `cfg.data` replaces the recipe's
    source with a local image folder, zip, parquet file or hub id.
    """
    source, settings, recipe_methods = load_recipe(cfg.recipe)
    methods = list(cfg.methods) or recipe_methods
    if not methods:
        raise ValueError(f"recipe {cfg.recipe} names no methods: pass --methods")
    overrides = _parse_set(cfg.set)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.data is None:
        data_dir = materialize(source, out / "data")
    elif is_hf_source(cfg.data):  # the same recipe (filter, captions) on another copy of the dataset
        data_dir = materialize(replace(source, source=str(cfg.data)), out / "data")
    else:
        data_dir = Path(cfg.data)
    embedder = load_embedder(cfg.clip)  # missing CLIP weights stop us before any training
    rows = []
    for method in methods:
        run = RunDir(out / method)
        if not run.lora.exists():
            train_cfg = TrainConfig.from_dict({**settings, **overrides, "method": method})
            started = run.checkpoint.is_file()  # an earlier attempt stopped: continue it; else start afresh
            train(replace(train_cfg, data=data_dir, output_dir=run.path, resume=run.path if started else None,
                          overwrite=not started))
        else:
            log.info("%s: trained run found in %s, reused", method, run.path)
        score = run.read_cmmd()
        if score is None or score["clip_model"] != embedder.model_name:
            score = evaluate_run(EvalConfig(run.path, clip=cfg.clip, steps=cfg.eval_steps, limit=cfg.eval_limit),
                                 embedder)
        rows.append({"method": method, "cmmd": score["cmmd"], "n_images": score["n_images"],
                     "steps": run.steps_done(), "clip_model": score["clip_model"],
                     "trustworthy": score["trustworthy"]})
    comparison = sample(SampleConfig(str(out / methods[0]), lora=tuple(out / m / RunDir.LORA for m in methods)))
    grid = save_grid(comparison, out / RunDir.GRID)
    return _write_table(out, cfg.recipe, rows, trust_label(embedder), grid)


def _write_table(out: Path, recipe: str | Path, rows: list[dict], label: str, grid: Path) -> Path:
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# CMMD, recipe `{Path(str(recipe)).stem}` (lower is better)", ""]
    if label:
        lines += [f"**{label}**", ""]
    lines += ["| method | CMMD | images | steps |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['cmmd']:.2f} | {r['n_images']} | {r['steps']} |" for r in rows]
    lines += ["", f"CMMD variant: {CMMD_VARIANT}.", f"CLIP model: {rows[0]['clip_model']}.",
              f"Samples, every method on the same prompts and seeds: `{grid.name}`."]
    bad = [r["method"] for r in rows if not math.isfinite(r["cmmd"])]
    if bad:
        raise FloatingPointError(f"CMMD is not finite for: {', '.join(bad)}")
    table = out / "table.md"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table
