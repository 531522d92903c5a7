"""CMMD evaluation: of two image folders, or of a training run by the protocol of op-lora.txt Sec. 4.1.

The run protocol ("Evaluation Protocol" in op-lora.txt Sec. 4.1): generate one new image for each training caption
with the adapted model, then compute CMMD (Jayasumana et al. 2024) between the generated images and the training
images. Lower is better. The adapter is loaded the way a user loads it, `pipe.load_lora_weights(file)` into a fresh
pipeline of the run's base model, so the score is the exported file's score.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

from metrics import ClipEmbedder, cmmd
from metrics.clip import IMAGE_EXTENSIONS, REFERENCE_MODEL
from pipelines.data import scan_dataset
from pipelines.export import CONFIG_FILE, LORA_FILE
from pipelines.model import default_device, load_pipeline

log = logging.getLogger(__name__)

CMMD_FILE = "cmmd.json"
EVAL_DIR = "eval"
IMAGES_DIR = "images"
BASE_IMAGES_DIR = "base-images"

TINY_RANDOM = "tiny-random"
"""`--clip-model` value for a tiny CLIP with random weights: runs in milliseconds, for tests; its scores mean nothing."""
_TINY_RANDOM_MODEL = "opdiff-tiny-random"  # the name it is registered under with open_clip
_TINY_RANDOM_SEED = 0
# A 1-layer ViT on 32 px images with 16-dim embeddings: the smallest open_clip config that embeds real images.
_TINY_RANDOM_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1},
}


def load_embedder(
    clip_model: str | None = None, clip_checkpoint: str | Path | None = None, device: str | None = None
) -> ClipEmbedder:
    """Return the CLIP image embedder CMMD is computed with.

    By default the reference model (ViT-L/14 at 336 px, OpenAI weights) from `clip_checkpoint` or the
    open_clip/Hugging Face cache; raises `metrics.ClipWeightsMissing`, saying how to get the weights, when there
    are none. `clip_model="tiny-random"` gives a tiny CLIP with fixed random weights, marked untrustworthy.
    """
    device = device or default_device()
    if clip_model == TINY_RANDOM:
        if clip_checkpoint is not None:
            raise ValueError(f"--clip-model {TINY_RANDOM} has random weights; it takes no --clip-checkpoint")
        _register_tiny_random()
        return ClipEmbedder.load(_TINY_RANDOM_MODEL, device=device, random_init=True, seed=_TINY_RANDOM_SEED)
    return ClipEmbedder.load(clip_model or REFERENCE_MODEL, checkpoint=clip_checkpoint, device=device)


def _register_tiny_random() -> None:
    """Make the tiny random CLIP config known to open_clip (once per process)."""
    if open_clip.get_model_config(_TINY_RANDOM_MODEL) is not None:
        return
    # open_clip registers configs from JSON files only; its registry keeps the entry after the file is gone.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{_TINY_RANDOM_MODEL}.json"
        path.write_text(json.dumps(_TINY_RANDOM_CONFIG), encoding="utf-8")
        open_clip.add_model_config(path)


def trust_label(embedder: ClipEmbedder) -> str:
    """Return "" for an embedder with real reference weights, else a one-line warning on what the score is worth."""
    if not embedder.trustworthy:
        return f"UNTRUSTWORTHY: random CLIP weights ({embedder.model_name}); this score means nothing"
    if embedder.model_name != REFERENCE_MODEL:
        return f"note: CLIP {embedder.model_name} is not the reference {REFERENCE_MODEL}; not comparable to published CMMD"
    return ""


def count_images(folder: str | Path) -> int:
    """Return how many images (png/jpg/jpeg/webp) lie directly in `folder`: what `cmmd_dirs` reads from it.

    Raises ValueError when `folder` is not a folder or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"not a folder: {folder}")
    n = sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if n == 0:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return n


def cmmd_dirs(
    ref: str | Path,
    gen: str | Path,
    embedder: ClipEmbedder,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
) -> float:
    """Return CMMD between the images directly in folder `ref` and those in folder `gen` (lower: closer).

    With `cache_dir`, each folder's embeddings are stored there and reused while its files are unchanged.
    """
    x = embedder.embed_folder(ref, cache_dir=cache_dir, batch_size=batch_size)  # (n, D)
    y = embedder.embed_folder(gen, cache_dir=cache_dir, batch_size=batch_size)  # (m, D)
    return cmmd(x, y)


def generate_for_captions(
    pipe: StableDiffusionXLPipeline,
    captions: Sequence[str],
    out_dir: str | Path,
    size: int,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 5.0,
    desc: str = "generate",
) -> list[Path]:
    """Generate one image per caption with `pipe` as it is; return the PNG paths, `out_dir/<index>.png`.

    Caption i is sampled from seed `seed + i` (CPU noise, so a seed gives the same start on any device), and
    its text goes next to the image as `<index>.txt`, which makes `out_dir` a captioned dataset. Whatever
    `out_dir` held before is removed first, so a folder never mixes two evaluations.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    paths = []
    for i, caption in enumerate(tqdm(captions, desc=desc, unit="img")):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        image = pipe(caption, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                     generator=generator).images[0]
        path = out_dir / f"{i:05d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
        paths.append(path)
    return paths


def evaluate_run(
    run_dir: str | Path,
    embedder: ClipEmbedder,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    limit: int | None = None,
    base_too: bool = False,
    batch_size: int = 16,
    device: str | None = None,
) -> dict:
    """Score a training run by op-lora.txt Sec. 4.1; write and return `run_dir/cmmd.json`.

    One image per training caption (the first `limit` captions when given) from the run's base model with its
    `lora.safetensors` loaded, at the training resolution, caption i from seed `seed + i`, saved under
    `run_dir/eval/images/`; then CMMD against all of the run's training images. `steps` and `guidance_scale`
    default to the run's sampling settings. With `base_too`, the base model is scored the same way on the same
    seeds (`base_cmmd`, images under `run_dir/eval/base-images/`). The result holds cmmd, n_images, clip_model,
    trustworthy, steps, seed, guidance_scale, n_reference (and base_cmmd).
    """
    run_dir = Path(run_dir)
    config_path, lora_path = run_dir / CONFIG_FILE, run_dir / LORA_FILE
    for required in (config_path, lora_path):
        if not required.is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run folder: {required.name} is missing")
    for name, value in (("steps", steps), ("limit", limit)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    run = json.loads(config_path.read_text(encoding="utf-8"))
    settings = run["train"]
    dataset = scan_dataset(run["dataset"]["path"])
    if dataset.hash != run["dataset"]["hash"]:
        log.warning("dataset %s changed since the run trained on it; scoring against its current images",
                    run["dataset"]["path"])
    captions = [ex.caption for ex in dataset.examples][:limit]
    steps = steps or settings["sample_steps"]
    (run_dir / CMMD_FILE).unlink(missing_ok=True)  # the images it described are about to be replaced
    guidance_scale = settings["guidance_scale"] if guidance_scale is None else guidance_scale

    pipe = load_pipeline(run["base"], device=device, vae=settings.get("vae"))  # the VAE the run trained with
    pipe.load_lora_weights(str(lora_path))
    generate = {"size": settings["resolution"], "seed": seed, "steps": steps, "guidance_scale": guidance_scale}
    adapted = generate_for_captions(pipe, captions, run_dir / EVAL_DIR / IMAGES_DIR, desc="eval: adapted", **generate)
    base = None
    if base_too:
        pipe.disable_lora()
        base = generate_for_captions(pipe, captions, run_dir / EVAL_DIR / BASE_IMAGES_DIR, desc="eval: base",
                                     **generate)
    del pipe  # frees the diffusion model's memory before CLIP runs

    reference = _embed_files(embedder, [ex.path for ex in dataset.examples], batch_size, "CLIP: training")  # (N, D)
    result = {"cmmd": cmmd(reference, _embed_files(embedder, adapted, batch_size, "CLIP: adapted"))}
    if base is not None:
        result["base_cmmd"] = cmmd(reference, _embed_files(embedder, base, batch_size, "CLIP: base"))
    result.update(
        n_images=len(captions),
        clip_model=embedder.model_name,
        trustworthy=embedder.trustworthy,
        steps=steps,
        seed=seed,
        guidance_scale=guidance_scale,
        n_reference=len(dataset),
    )
    tmp = run_dir / (CMMD_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / CMMD_FILE)  # a reader never sees half a file
    return result


def _embed_files(embedder: ClipEmbedder, paths: Sequence[Path], batch_size: int, desc: str) -> np.ndarray:
    """Return the CLIP embeddings (N, D) of image files, reading only `batch_size` images into memory at a time."""
    chunks = []
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            chunks.append(embedder.embed(images, batch_size=batch_size, progress=False))  # (B, D)
            bar.update(len(images))
    return np.concatenate(chunks)
