"""CMMD evaluation: of two image folders, or of a training run by the protocol of op-lora.txt Sec. 4.1.

The run protocol ("Evaluation Protocol" in op-lora.txt Sec. 4.1): generate one new image for each training caption
with the adapted model, then compute CMMD (Jayasumana et al. 2024) between the generated images and the training
images. Lower is better. The adapter is loaded the way a user loads it, `pipe.load_lora_weights(file)` into a fresh
pipeline of the run's base model, so the score is the exported file's score.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

from metrics import ClipEmbedder, ClipWeightsMissing, cmmd
from metrics.clip import IMAGE_EXTENSIONS, REFERENCE_MODEL, cached_weights, download_allowed
from opdiff.settings import Settings, option
from pipelines.captions import CaptionRules
from pipelines.config import REPO_ROOT
from pipelines.data import scan_dataset
from pipelines.model import default_device, load_pipeline
from pipelines.rundir import RunDir

log = logging.getLogger(__name__)

__all__ = ["REFERENCE_MODEL", "ClipAvailability", "ClipOptions", "ClipWeightsMissing", "CmmdConfig", "EvalConfig",
           "clip_availability", "cmmd_dirs", "evaluate_run", "load_embedder", "trust_label"]
# ClipWeightsMissing, REFERENCE_MODEL: the GUI reaches metrics through pipelines

IMAGES_DIR = "images"
BASE_IMAGES_DIR = "base-images"
MIN_CMMD_IMAGES = 10
"""Fewest images per set for a CMMD worth reading. The estimator (the biased MMD^2 the reference computes) averages
each set's kernel over all n^2 pairs, n of which compare an image with itself (kernel 1, whatever it shows): below 10
images more than a tenth of each within-set average is that constant, so the score says more about how many images
there are than about what they show. With one image per set it is just the distance of two images, 2000 (1 - k)."""

DEMO_CLIP = "demo"
"""`--clip-model` value for the bundled tiny CLIP (assets/tiny-clip), pretrained on the demo model's procedural
world: it runs anywhere offline and ranks demo runs, but its scores are not comparable to published CMMD."""
BUNDLED_CLIP = REPO_ROOT / "assets" / "tiny-clip"


@dataclass
class ClipOptions(Settings):
    """Which CLIP model CMMD is computed with, and how it runs."""

    clip_model: str | None = option(
        None, f"CLIP model: an open_clip model name, or `{DEMO_CLIP}` for the small CLIP bundled with the demo model "
        "(offline; ranks demo runs, not comparable to published CMMD).", group="basic",
        none_means=f"{REFERENCE_MODEL}, the CMMD reference", label="CLIP model")
    clip_checkpoint: Path | None = option(
        None, "CLIP weights file (open_clip_model.safetensors of ViT-L-14-336-quickgelu, or OpenAI's "
        "ViT-L-14-336px.pt).", group="basic", none_means="the open_clip / Hugging Face cache",
        label="CLIP weights file")
    batch_size: int = option(16, "Images per CLIP forward pass.", minimum=1, label="CLIP batch size")
    device: str | None = option(None, "Torch device to run on, e.g. cuda:1.", none_means="cuda when available, else cpu")


def load_embedder(options: ClipOptions | None = None) -> ClipEmbedder:
    """Return the CLIP image embedder CMMD is computed with.

    By default the reference model (ViT-L/14 at 336 px, OpenAI weights) from `clip_checkpoint` or the
    open_clip/Hugging Face cache; raises `metrics.ClipWeightsMissing`, saying how to get the weights, when there
    are none. `clip_model="demo"` is the bundled tiny CLIP.
    """
    options = options or ClipOptions()
    device = options.device or default_device()
    if options.clip_model == DEMO_CLIP:
        if options.clip_checkpoint is not None:
            raise ValueError(f"--clip-model {DEMO_CLIP} is the bundled CLIP; it takes no --clip-checkpoint")
        return ClipEmbedder.load(f"local-dir:{BUNDLED_CLIP}", checkpoint=BUNDLED_CLIP / "open_clip_model.safetensors",
                                 device=device)
    return ClipEmbedder.load(options.clip_model or REFERENCE_MODEL, checkpoint=options.clip_checkpoint, device=device)


@dataclass(frozen=True)
class ClipAvailability:
    """Which CLIP models can score here, found without loading or downloading anything."""

    reference: Path | None
    """The reference model's weights file in the local caches, or None."""
    can_download: bool
    """Whether the reference weights may be downloaded (HF_HUB_OFFLINE is not set); a download may still fail."""
    demo: bool
    """Whether the bundled demo CLIP is present."""


def clip_availability() -> ClipAvailability:
    """Return which CLIP models are available now (the reference's caches are looked up; nothing is loaded)."""
    return ClipAvailability(cached_weights(REFERENCE_MODEL), download_allowed(),
                            (BUNDLED_CLIP / "open_clip_model.safetensors").is_file())


def trust_label(embedder: ClipEmbedder) -> str:
    """Return "" for an embedder with real reference weights, else a one-line warning on what the score is worth."""
    return score_note(embedder.model_name, embedder.trustworthy)


def score_note(clip_model: str, trustworthy: bool) -> str:
    """What a score made with this CLIP is worth: "" for the reference model, else a one-line warning."""
    if not trustworthy:
        return f"UNTRUSTWORTHY: random CLIP weights ({clip_model}); this score means nothing"
    if clip_model == f"local-dir:{BUNDLED_CLIP}":
        return ("note: the bundled demo CLIP ranks runs on the demo model; its scores are not comparable to "
                "published CMMD")
    if clip_model != REFERENCE_MODEL:
        return f"note: CLIP {clip_model} is not the reference {REFERENCE_MODEL}; not comparable to published CMMD"
    return ""


def small_sample_warning(n_reference: int, n_compared: int) -> str:
    """Return a one-line warning when either set has fewer than MIN_CMMD_IMAGES images, else ""."""
    n = min(n_reference, n_compared)
    if n >= MIN_CMMD_IMAGES:
        return ""
    return (f"warning: CMMD from {n} image(s) in a set means little: each set's average includes its images compared "
            f"with themselves (1/{n} of it here), so below {MIN_CMMD_IMAGES} images per set the score reflects the "
            "sample size more than the images; use more images")


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
    on_image: Callable[[], None] | None = None,
) -> list[Path]:
    """Generate one image per caption with `pipe` as it is; return the PNG paths, `out_dir/<index>.png`.

    `on_image()` is called after each image is saved (a progress display).

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
        if on_image is not None:
            on_image()
    return paths


@dataclass
class EvalConfig(Settings):
    """`opdiff eval`: score a run by the papers' protocol."""

    run_dir: Path = option(help="A run folder written by `opdiff train`.", group="run", positional=True)
    clip: ClipOptions = field(default_factory=ClipOptions)
    steps: int | None = option(None, "Denoising steps per image.", group="basic", minimum=1,
                               none_means="the run's sample_steps")
    guidance_scale: float | None = option(None, "Classifier-free guidance scale: how strongly images follow the prompt.", group="basic", minimum=0,
                                          none_means="the run's guidance_scale", label="guidance scale")
    seed: int = option(0, "Caption i is generated from seed SEED + i.", group="basic")
    limit: int | None = option(None, "Generate for the first N captions only.", group="basic", minimum=1,
                               none_means="all captions")
    base_too: bool = option(False, "Also score the base model without the LoRA, on the same captions and seeds.",
                            group="basic", label="score the base too")


def evaluate_run(cfg: EvalConfig, embedder: ClipEmbedder,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Score a training run by op-lora.txt Sec. 4.1; write and return `run_dir/cmmd.json`.

    One image per training caption (the first `limit` captions when given) from the run's base model with its
    `lora.safetensors` loaded, at the training resolution, caption i from seed `seed + i`, saved under
    `run_dir/eval/images/`; then CMMD against all of the run's training images. `steps` and `guidance_scale`
    default to the run's sampling settings. With `base_too`, the base model is scored the same way on the same
    seeds (`base_cmmd`, images under `run_dir/eval/base-images/`). The result holds cmmd, n_images, clip_model,
    trustworthy, steps, seed, guidance_scale, n_reference (and base_cmmd); it is also kept in `scores.json`
    beside the run's other scores, replacing only one made with the same CLIP, image count, steps, seed and
    guidance (`RunDir.SCORE_KEY`). `progress(done, total)` is called after each generated image.
    """
    run = RunDir(cfg.run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run.path} is not a finished run folder: {RunDir.CONFIG} is missing")
    lora = run.current_lora()  # a stopped run is scored as it stands, by its partial file
    if not lora.is_file():
        raise FileNotFoundError(f"{run.path} is not a finished run folder: {lora.name} is missing")
    config = run.read_config()
    settings = config["train"]
    dataset = scan_dataset(config["dataset"]["path"])
    if dataset.hash != config["dataset"]["hash"]:
        log.warning("dataset %s changed since the run trained on it; scoring against its current images",
                    config["dataset"]["path"])
    rules = CaptionRules(trigger_word=settings.get("trigger_word"))  # prompted as the adapter was trained
    captions = [rules.fixed(ex.caption) for ex in dataset.examples][: cfg.limit]
    steps = cfg.steps or settings["sample_steps"]
    run.cmmd.unlink(missing_ok=True)  # the images it described are about to be replaced
    guidance_scale = settings["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale
    batch_size = cfg.clip.batch_size

    pipe = load_pipeline(config["base"], device=cfg.clip.device, vae=settings.get("vae"))
    pipe.load_lora_weights(str(lora))
    done, total = 0, len(captions) * (2 if cfg.base_too else 1)

    def image_done() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    generate = {"size": settings["resolution"], "seed": cfg.seed, "steps": steps, "guidance_scale": guidance_scale,
                "on_image": image_done}
    adapted = generate_for_captions(pipe, captions, run.eval_dir / IMAGES_DIR, desc="eval: adapted", **generate)
    base = None
    if cfg.base_too:
        pipe.disable_lora()
        base = generate_for_captions(pipe, captions, run.eval_dir / BASE_IMAGES_DIR, desc="eval: base", **generate)
    del pipe  # frees the diffusion model's memory before CLIP runs

    reference = _embed_files(embedder, [ex.path for ex in dataset.examples], batch_size, "CLIP: training")  # (N, D)
    result = {"cmmd": cmmd(reference, _embed_files(embedder, adapted, batch_size, "CLIP: adapted"))}
    if base is not None:
        result["base_cmmd"] = cmmd(reference, _embed_files(embedder, base, batch_size, "CLIP: base"))
    if warning := small_sample_warning(len(dataset), len(captions)):
        result["warning"] = warning
        log.warning("%s", warning)
    result.update(
        lora=lora.name,
        n_images=len(captions),
        clip_model=embedder.model_name,
        trustworthy=embedder.trustworthy,
        steps=steps,
        seed=cfg.seed,
        guidance_scale=guidance_scale,
        n_reference=len(dataset),
    )
    run.write_cmmd(result)  # a reader never sees half a file
    run.add_score(result)
    return result


@dataclass
class CmmdConfig(Settings):
    """`opdiff cmmd`: CMMD between two image folders."""

    ref_dir: Path = option(help="Folder of reference images (e.g. the training images).", group="run",
                           positional=True)
    gen_dir: Path = option(help="Folder of images to compare (e.g. generated ones).", group="run", positional=True)
    clip: ClipOptions = field(default_factory=ClipOptions)
    cache_dir: Path | None = option(None, "Store each folder's CLIP embeddings here and reuse them while its files "
                                    "are unchanged.", none_means="no cache", label="embedding cache")


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
