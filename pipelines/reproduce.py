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
from dataclasses import fields, replace
from pathlib import Path

from pipelines.config import TrainConfig
from pipelines.export import LORA_FILE
from pipelines.hf_data import HFSource, is_hf_source, materialize

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


def load_recipe(recipe: str | Path) -> tuple[HFSource, dict]:
    """Return (where the data comes from, the training settings) of a recipe file."""
    spec = tomllib.loads(recipe_path(recipe).read_text(encoding="utf-8"))
    data = dict(spec.get("data", {}))
    if "caption_template" in data:
        data.setdefault("caption_column", None)
    data["filter"] = tuple(tuple(f) for f in data.get("filter", ()))
    unknown = set(data) - {f.name for f in fields(HFSource)}
    if unknown:
        raise ValueError(f"recipe {recipe}: unknown [data] setting(s): {', '.join(sorted(unknown))}")
    train = dict(spec.get("train", {}))
    TrainConfig.from_dict(train)  # fail now, naming bad keys, not after hours of training
    return HFSource(**data), train


def reproduce(
    recipe: str | Path,
    methods: list[str],
    output_dir: str | Path,
    overrides: dict | None = None,
    data: str | Path | None = None,
    clip_model: str | None = None,
    clip_checkpoint: str | Path | None = None,
    eval_steps: int | None = None,
    eval_limit: int | None = None,
) -> Path:
    """Train, generate and score every method; return the Markdown table's path (a CSV and a grid lie beside it).

    `overrides` replace recipe settings (e.g. a local `base`, fewer `max_steps`); `data` replaces the recipe's source
    with a local image folder, zip, parquet file or hub id.
    """
    from pipelines.evaluate import evaluate_run, load_embedder, trust_label
    from pipelines.sample import sample
    from pipelines.train import train

    source, settings = load_recipe(recipe)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data_dir = materialize(source, out / "data")
    elif is_hf_source(data):  # the same recipe (filter, captions) on another copy of the dataset
        data_dir = materialize(replace(source, source=str(data)), out / "data")
    else:
        data_dir = Path(data)
    embedder = load_embedder(clip_model, clip_checkpoint)  # missing CLIP weights stop us before any training
    rows = []
    for method in methods:
        run_dir = out / method
        if not (run_dir / LORA_FILE).exists():
            cfg = TrainConfig.from_dict({**settings, **(overrides or {}), "method": method})
            train(replace(cfg, data=data_dir, output_dir=run_dir))
        else:
            log.info("%s: trained run found in %s, reused", method, run_dir)
        score_file = run_dir / "cmmd.json"
        if not score_file.exists() or json.loads(score_file.read_text())["clip_model"] != embedder.model_name:
            evaluate_run(run_dir, embedder, steps=eval_steps, limit=eval_limit)
        score = json.loads(score_file.read_text())
        rows.append({"method": method, "cmmd": score["cmmd"], "n_images": score["n_images"],
                     "steps": _steps(run_dir),
                     "clip_model": score["clip_model"], "trustworthy": score["trustworthy"]})
    grid = sample(out / methods[0], loras=[out / m / LORA_FILE for m in methods], out_file=out / "samples.png")
    return _write_table(out, recipe, rows, trust_label(embedder), grid)


def _steps(run_dir: Path) -> int:
    """Optimizer steps the run took (rows of its loss log)."""
    with open(run_dir / "losses.csv", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f))


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
