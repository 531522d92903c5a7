"""Caption augmentation: a trigger word, caption dropout and shuffled tags, as kohya's sd-scripts offer them.

Each step's captions are a function of (seed, step, position in the global batch) alone, drawn from a generator of
their own: a resumed run, another number of processes or of accumulation steps draws the same captions, and the
training generator (views, noise, timesteps) is untouched, so runs without augmentation are as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from pipelines.config import TrainConfig


@dataclass(frozen=True)
class CaptionRules:
    """How a dataset caption becomes the caption a step trains on."""

    trigger_word: str | None = None
    dropout_rate: float = 0.0
    """Probability that a drawn caption is replaced by the empty caption (no trigger word either)."""
    shuffle: bool = False
    """Shuffle the comma-separated tags after the first `keep_tokens` (kohya's shuffle_caption)."""
    keep_tokens: int = 0

    @classmethod
    def of(cls, cfg: TrainConfig) -> CaptionRules:
        """The rules a run's settings ask for."""
        return cls(cfg.trigger_word or None, cfg.caption_dropout_rate, cfg.shuffle_caption, cfg.keep_tokens)

    @property
    def random(self) -> bool:
        """Whether captions change from step to step."""
        return self.dropout_rate > 0 or self.shuffle

    def fixed(self, caption: str) -> str:
        """The caption with the trigger word in front: what sample prompts and probes use."""
        if not self.trigger_word:
            return caption
        return f"{self.trigger_word}, {caption}" if caption else self.trigger_word

    def step_captions(self, captions: list[str], seed: int, step: int) -> list[str]:
        """The captions of step `step` for the global batch whose dataset captions are `captions`, in order."""
        if not self.random:
            return [self.fixed(c) for c in captions]
        digest = hashlib.sha256(f"{seed}/captions/{step}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        out = []
        for caption in captions:
            if self.dropout_rate and float(torch.rand((), generator=generator)) < self.dropout_rate:
                out.append("")
                continue
            out.append(self.fixed(shuffle_tags(caption, self.keep_tokens, generator) if self.shuffle else caption))
        return out


def shuffle_tags(caption: str, keep: int, generator: torch.Generator) -> str:
    """Return the comma-separated tags of `caption` with all but the first `keep` in random order."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    fixed, free = tags[:keep], tags[keep:]
    order = torch.randperm(len(free), generator=generator).tolist()
    return ", ".join(fixed + [free[i] for i in order])
