"""The dataset as the training loop draws it: buckets, per-step views (crop, flip), batches and their U-Net inputs.

Batches are a function of (seed, epoch) alone, so a resumed run draws exactly the batches an uninterrupted run
would have drawn, without saved state.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from tqdm.auto import tqdm

from pipelines.captions import CaptionRules
from pipelines.config import TrainConfig
from pipelines.data import Dataset, View, bucket_sizes, center_view, crop_region, nearest_bucket
from pipelines.encoding import (
    Encoded,
    cache_entry,
    cache_read,
    cache_write,
    encode_batch,
    encode_caption,
    encode_image,
    text_identity,
)
from pipelines.model import fingerprint

log = logging.getLogger(__name__)

UPSCALE_WARNING = 2.0  # images enlarged more than this to fit their bucket are named in the log (blurry input)
DRAWN_CAPTIONS = 256  # shuffled captions kept encoded (SDXL: 0.6 MB each); older ones are encoded again if drawn


class TrainingData:
    """The dataset as the training loop draws it: each example's bucket, this step's views, their U-Net inputs.

    Each image goes to the bucket closest to its aspect ratio (one square bucket with `buckets` off). Views
    (crop, flip) are drawn from the training generator, so a run repeats exactly. Cached (`cache_latents`):
    before training, every image's crop region (and its mirror image with `flip`) and every caption are encoded
    once, or read from `cache_dir`, keyed by content, model weights and region; then the VAE and text encoders
    go back to the CPU. A random crop is then a slice of the region's latent: crops lie on the VAE's 8-pixel
    grid. Uncached: each batch is encoded as it is drawn, with the encoders kept on the device.

    Captions follow `CaptionRules` (trigger word, dropout, shuffled tags). Every caption those rules can give
    without shuffling is encoded with the rest; shuffled tags give new captions all the time, so the text encoders
    then stay on the device and encode each one when first drawn (kept in a bounded memory cache).
    """

    def __init__(self, pipe: StableDiffusionXLPipeline, dataset: Dataset, cfg: TrainConfig, device: str) -> None:
        self.pipe, self.examples, self.device = pipe, dataset.examples, device
        self.rules, self.seed = CaptionRules.of(cfg), cfg.seed
        self.drawn: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # shuffled captions
        self.random_crop, self.flip, self.cached = cfg.random_crop, cfg.flip, cfg.cache_latents
        self.grid = pipe.vae_scale_factor
        sizes = bucket_sizes(cfg.resolution) if cfg.buckets else [(cfg.resolution, cfg.resolution)]
        self.buckets = [nearest_bucket(ex.size, sizes) for ex in self.examples]
        self.regions = [crop_region(ex.size, b, self.grid) if self.random_crop else center_view(ex.size, b)
                        for ex, b in zip(self.examples, self.buckets, strict=True)]
        for ex, region, bucket in zip(self.examples, self.regions, self.buckets, strict=True):
            if region.resized[0] / ex.size[0] > UPSCALE_WARNING:
                log.warning("%s is %dx%d, enlarged %.1fx to fit its %dx%d bucket: expect a blurry training image",
                            ex.path.name, *ex.size, region.resized[0] / ex.size[0], *bucket)
        log.info("buckets (height x width: images): %s",
                 ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(Counter(self.buckets).items())))
        self.latents: list[dict[bool, torch.Tensor]] = []  # per example: {flipped: (4, H/8, W/8) of its region}
        self.texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # caption -> ((77, D), (P,))
        if self.cached:
            self._encode_all(cfg.cache_dir)
        else:
            self._move_encoders(device)

    def views(self, index: list[int], rng: torch.Generator) -> list[View]:
        """Draw this step's view of each example in `index`: flip (p = 1/2 with `flip`), then the crop offset."""
        views = []
        for i in index:
            region, bucket = self.regions[i], self.buckets[i]
            flip = self.flip and bool(torch.randint(2, (1,), generator=rng))
            top, left = region.top, region.left
            if self.random_crop:  # any grid position whose crop stays inside the region
                rows, cols = ((r - b) // self.grid + 1 for r, b in zip(region.size, bucket, strict=True))
                top += self.grid * int(torch.randint(rows, (1,), generator=rng))
                left += self.grid * int(torch.randint(cols, (1,), generator=rng))
            views.append(View(region.original, region.resized, top, left, bucket, flip))
        return views

    def central_view(self, i: int) -> View:
        """The crop of example i nearest its center that `views` can draw (unflipped)."""
        region, bucket, g = self.regions[i], self.buckets[i], self.grid
        top = region.top + g * ((region.size[0] - bucket[0]) // g // 2)
        left = region.left + g * ((region.size[1] - bucket[1]) // g // 2)
        return View(region.original, region.resized, top, left, bucket)

    def latent_shape(self, i: int) -> tuple[int, int, int]:
        """Return the (C, h, w) latent shape of example i at its bucket's size."""
        height, width = self.buckets[i]
        f = self.pipe.vae_scale_factor
        return self.pipe.unet.config.in_channels, height // f, width // f

    def captions(self, index: list[int], step: int) -> list[str]:
        """The captions step `step` trains the global batch `index` on (see `pipelines.captions`)."""
        return self.rules.step_captions([self.examples[i].caption for i in index], self.seed, step)

    def batch(self, index: list[int], views: list[View], captions: list[str] | None = None) -> Encoded:
        """Return the U-Net inputs of `views` of the examples at `index` with `captions`, on the training device.

        Captions default to the examples' own with the trigger word (`CaptionRules.fixed`).
        """
        examples = [self.examples[i] for i in index]
        captions = captions or [self.rules.fixed(ex.caption) for ex in examples]
        if not self.cached:
            return encode_batch(self.pipe, examples, views, captions).to(self.device)
        latents = [self._crop(i, v) for i, v in zip(index, views, strict=True)]
        texts = [self._text(c) for c in captions]
        time_ids = torch.tensor([v.time_ids() for v in views], dtype=torch.float32)  # (B, 6)
        return Encoded(torch.stack(latents), torch.stack([e for e, _ in texts]), torch.stack([p for _, p in texts]),
                       time_ids).to(self.device)

    def _text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded caption: from the cache, or encoded now (a shuffled one) and kept while there is room."""
        if caption in self.texts:
            return self.texts[caption]
        if caption not in self.drawn:
            self.drawn[caption] = encode_caption(self.pipe, caption)
            if len(self.drawn) > DRAWN_CAPTIONS:
                self.drawn.popitem(last=False)
        self.drawn.move_to_end(caption)
        return self.drawn[caption]

    def _crop(self, i: int, view: View) -> torch.Tensor:
        """The latent of `view`: a slice of the cached latent of example i's region (mirrored when flipped)."""
        region, g = self.regions[i], self.grid
        top = (view.top - region.top) // g
        left = view.left - region.left
        if view.flip:  # in the mirrored region the crop starts where the unflipped one ends, counted from the right
            left = region.size[1] - left - view.size[1]
        return self.latents[i][view.flip][:, top: top + view.size[0] // g, left // g: (left + view.size[1]) // g]

    def _encode_all(self, cache_dir: Path | None) -> None:
        """Fill `latents` and `texts`; the encoders visit the device only if something is not in the cache."""
        moved = False

        def encoders_ready() -> StableDiffusionXLPipeline:
            nonlocal moved
            if not moved:
                self._move_encoders(self.device)
                moved = True
            return self.pipe

        try:
            self._encode_or_read(cache_dir, encoders_ready)
        finally:
            if moved:  # not needed again while training: free the accelerator for the U-Net
                self._move_encoders("cpu", text=not self.rules.shuffle)
                if torch.device(self.device).type == "cuda":
                    torch.cuda.empty_cache()
        if self.rules.shuffle:  # shuffled captions are encoded as they are drawn, on the device
            self._move_encoders(self.device, vae=False)

    def _encode_or_read(self, cache_dir: Path | None, encoders: Callable[[], StableDiffusionXLPipeline]) -> None:
        latents_dir = None if cache_dir is None else Path(cache_dir) / "latents"
        texts_dir = None if cache_dir is None else Path(cache_dir) / "text"
        vae_id = text_id = ""  # the models' identities key the disk cache; memory needs no key
        if cache_dir is not None:
            vae_id, text_id = fingerprint(self.pipe.vae), text_identity(self.pipe)
        hits = 0
        for ex, region in tqdm(list(zip(self.examples, self.regions, strict=True)), desc="encode images",
                               unit="image", disable=len(self.examples) < 16):
            path = cache_entry(latents_dir, "latent", ex.sha256, vae_id, region, self.flip)
            entry = cache_read(path)
            if entry is None:
                entry = {"latent": encode_image(encoders(), ex.path, region)}
                if self.flip:
                    entry["flipped"] = encode_image(encoders(), ex.path, replace(region, flip=True))
                cache_write(path, entry)
            else:
                hits += 1
            self.latents.append({False: entry["latent"], True: entry.get("flipped")})
        fixed = [self.rules.fixed(ex.caption) for ex in self.examples]
        for caption in dict.fromkeys(fixed + ([""] if self.rules.dropout_rate else [])):
            path = cache_entry(texts_dir, "text", caption, text_id)
            entry = cache_read(path)
            if entry is None:
                embeds, pooled = encode_caption(encoders(), caption)
                entry = {"prompt_embeds": embeds, "pooled": pooled}
                cache_write(path, entry)
            else:
                hits += 1
            self.texts[caption] = (entry["prompt_embeds"], entry["pooled"])
        if cache_dir is not None:
            log.info("latent/text cache %s: %d of %d entries found", cache_dir, hits,
                     len(self.latents) + len(self.texts))

    def _move_encoders(self, device: str, vae: bool = True, text: bool = True) -> None:
        for module in [self.pipe.vae] * vae + [self.pipe.text_encoder, self.pipe.text_encoder_2] * text:
            module.to(device)


def epoch_batches(buckets: list, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Return the batches of epoch `epoch` (0-based): example indices, each batch from one bucket.

    The indices are shuffled, cut into batches of at most `batch_size` per bucket, and the batches shuffled.
    Seeded by (seed, epoch) alone, so a resumed run draws the same batches without any saved state.
    """
    generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{epoch}".encode()).digest()[:8]))
    order = torch.randperm(len(buckets), generator=generator).tolist()
    batches = []
    for bucket in dict.fromkeys(buckets[i] for i in order):
        members = [i for i in order if buckets[i] == bucket]
        batches += [members[k: k + batch_size] for k in range(0, len(members), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


def steps_per_epoch(buckets: list, batch_size: int) -> int:
    """Return the number of batches `epoch_batches` yields per epoch."""
    return sum(math.ceil(n / batch_size) for n in Counter(buckets).values())


def probe_batches(data: TrainingData, num_train_timesteps: int, seed: int, n: int) -> list[tuple]:
    """Return n fixed (batch, noise, timesteps): example k % N at its central view, noise and t from `seed + 1`.

    A generator of their own, so probing never changes the training run's random stream or loss curve.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    probes = []
    for k in range(n):
        i = k % len(data.examples)
        batch = data.batch([i], [data.central_view(i)])
        noise = torch.randn(batch.latents.shape, generator=generator).to(batch.latents.device)
        t = torch.randint(0, num_train_timesteps, (1,), generator=generator)
        probes.append((batch, noise, t.to(batch.latents.device)))
    return probes
