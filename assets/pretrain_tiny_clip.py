"""Pretrain a tiny open_clip CLIP on the procedural world, for a demo CMMD that runs offline in seconds.

The real CMMD embeds images with OpenAI's CLIP ViT-L/14 at 336 px (``metrics.clip``); no such weights can
be bundled. This model is a stand-in of the same kind: an open_clip ``CLIP`` (a ViT image tower on 64 px
images, patch 8; a text transformer with open_clip's own tokenizer) trained contrastively (the symmetric
InfoNCE loss of CLIP) on the procedural world, plain and with random looks whose captions name them
("..., with dark outlines, in muted colours"). Knowing looks is what lets its embeddings, and so the demo
CMMD, tell a style apart from the content; it is a demo metric and not comparable to published CMMD.

The folder it writes is an open_clip local model: ``open_clip_config.json`` (model and preprocessing: OpenAI's
mean and std, bicubic, as the CMMD reference) and ``open_clip_model.safetensors`` (float16, under 2 MB).
Load it with ``open_clip.create_model("local-dir:assets/tiny-clip")`` or, for CMMD,
``metrics.ClipEmbedder.load("local-dir:assets/tiny-clip", checkpoint="assets/tiny-clip/open_clip_model.safetensors")``.

Training reuses the procedural world cache, step seeding, checkpoints (resumable) and weight averaging of
``pretrain_tiny_sdxl.py``.

Usage: ``nice -n 19 python assets/pretrain_tiny_clip.py [--work .work-pretrain] [--out DIR]``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file

ASSETS = Path(__file__).resolve().parent
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the CMMD reference's preprocessing (metrics.clip)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Sized to stay under 2 MB in float16: the text tower's 49408-token embedding (x 16) is most of it.
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 48, "head_width": 24, "layers": 3, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}


def _load_script(name: str):
    # assets/ holds scripts, not a package; load a sibling by path (once per process).
    module_name = f"assets_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ASSETS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


sdxl = _load_script("pretrain_tiny_sdxl")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the tiny CLIP's weights; the defaults made the bundled ones."""

    seed: int = 0
    """Seed of the worlds (the same caches as the SDXL pretraining) and of every step's batch."""
    world_size: int = 8000
    """Plain-world images."""
    looks_size: int = 4000
    """World images with random looks."""
    steps: int = 400
    """Optimizer steps."""
    batch: int = 128
    """Image-caption pairs per step (half plain, half looked); the others in the batch are the negatives."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay."""
    warmup: int = 50
    """Linear learning-rate warm-up steps."""
    ema_decay: float = 0.99
    """Decay of the weights' moving average."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints."""

    def identity(self) -> dict:
        """Return the settings a checkpoint must share to be resumed: all but the step count."""
        return {k: v for k, v in asdict(self).items() if k not in ("steps", "checkpoint_every")}


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """Return uint8 images (B, 3, 64, 64) normalized as ``metrics.clip.preprocess`` does (float32)."""
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def clip_loss(model: open_clip.CLIP, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Return CLIP's symmetric contrastive loss for matching pairs (pixels[i], tokens[i]) (scalar)."""
    image = F.normalize(model.encode_image(pixels), dim=-1)  # (B, E)
    text = F.normalize(model.encode_text(tokens), dim=-1)  # (B, E)
    logits = model.logit_scale.exp().clamp(max=100) * image @ text.T  # (B, B)
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def pretrain(settings: Settings, work: Path) -> open_clip.CLIP:
    """Train the tiny CLIP (resuming from ``work/clip.pt``) and return it with its averaged weights."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    model = open_clip.CLIP(**MODEL_CFG)
    plain, plain_captions = sdxl.world_cache(settings, work, looks=False)
    looked, looked_captions = sdxl.world_cache(settings, work, looks=True)
    tokenizer = SimpleTokenizer()
    context = MODEL_CFG["text_cfg"]["context_length"]
    plain_tokens = tokenizer(plain_captions, context_length=context)  # (N, 48)
    looked_tokens = tokenizer(looked_captions, context_length=context)
    half = settings.batch // 2

    def loss_fn(g: torch.Generator, step: int) -> torch.Tensor:
        i = torch.randint(len(plain), (settings.batch - half,), generator=g)
        j = torch.randint(len(looked), (half,), generator=g)
        pixels = images_to_input(torch.cat([plain[i], looked[j]]))  # (B, 3, 64, 64)
        return clip_loss(model, pixels, torch.cat([plain_tokens[i], looked_tokens[j]]))

    # CLIP's recipe: no weight decay on gains, biases, embeddings and the temperature.
    sdxl.train_loop("clip", 3, {"clip": model}, loss_fn, settings.steps, settings.lr, settings, settings.identity(), work,
                     weight_decay=settings.weight_decay, no_decay=lambda name, p: p.ndim < 2 or "embedding" in name)
    return model


def save(model: open_clip.CLIP, out: Path) -> Path:
    """Write ``model`` as an open_clip local model folder (config + float16 safetensors); return ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    return out


@torch.no_grad()
def report(model: open_clip.CLIP, seed: int = 0, count: int = 256) -> dict[str, float]:
    """Return held-out checks: image-to-text top-1 retrieval among ``count`` unseen world pairs (chance 1/count)."""
    model.eval()
    tokenizer = SimpleTokenizer()
    images, captions = sdxl.procedural.world(count, seed, start=10**6, looks=True)  # far past the caches
    pixels = images_to_input(torch.from_numpy(images).permute(0, 3, 1, 2))
    image = F.normalize(model.encode_image(pixels), dim=-1)  # (n, E)
    text = F.normalize(model.encode_text(tokenizer(captions, context_length=MODEL_CFG["text_cfg"]["context_length"])),
                       dim=-1)
    sims = image @ text.T  # (n, n)
    target = torch.arange(count)
    return {
        "image_to_text_top1": (sims.argmax(1) == target).float().mean().item(),
        "text_to_image_top1": (sims.argmax(0) == target).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Settings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"(default: {f.default})")
    parser.add_argument("--work", type=Path, default=sdxl.DEFAULT_WORK,
                        help="folder for the rendered world and resumable checkpoints (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: WORK/tiny-clip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    start = time.perf_counter()
    model = pretrain(settings, args.work)
    out = save(model, args.out or args.work / "tiny-clip")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"saved {out} ({size / 1e6:.2f} MB) in {time.perf_counter() - start:.0f} s; held-out: {report(model)}")


if __name__ == "__main__":
    main()
