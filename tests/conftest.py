"""Shared fixtures: the bundled tiny model and demo images, offline hub, small generated datasets."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

# Set before the test modules import any Hugging Face library: nothing in the tests may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "assets" / "tiny-sdxl"
BUNDLED_DATA = REPO / "assets" / "demo-data"


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The bundled tiny SDXL-architecture pipeline folder."""
    assert (BUNDLED_MODEL / "model_index.json").is_file(), f"bundled model missing at {BUNDLED_MODEL}"
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def bundled_data() -> Path:
    """The bundled demo images with same-name captions."""
    assert any(BUNDLED_DATA.glob("*.png")), f"bundled demo data missing at {BUNDLED_DATA}"
    return BUNDLED_DATA


@pytest.fixture
def demo_subset(tmp_path: Path, bundled_data: Path) -> Callable[[int], Path]:
    """Return a factory: n -> a folder in tmp_path holding the first n bundled images and their captions."""

    def make(n: int) -> Path:
        out = tmp_path / f"data{n}"
        out.mkdir()
        for image in sorted(bundled_data.glob("*.png"))[:n]:
            shutil.copy(image, out / image.name)
            shutil.copy(image.with_suffix(".txt"), out / image.with_suffix(".txt").name)
        return out

    return make


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run a test on one intra-op thread: the tiny model gains nothing from more, and spinning threads stall
    for seconds per step whenever another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def quick_settings() -> Callable[[str], dict]:
    """Return method -> TrainConfig settings that make every method do its full work within 3 training steps.

    Selection happens at once (MPOP after 1 warm-up step; MPOR one matrix per group per step, 2 per group).
    MPOP's Eq. 7 needs one forward pass per scored matrix, so for it only the `to_q` and `to_out.0` layers
    are adapted.
    """
    selection = {"select_warmup_steps": 1, "select_every": 1, "select_top_n": 2, "select_split": 2, "select_batches": 1}

    def settings(method: str) -> dict:
        targets = {"target_modules": ("to_q", "to_out.0")} if method == "lora-over-mpop" else {}
        return {"method": method, **selection, **targets}

    return settings


RANDOM_CLIP = "opdiff-tiny-random"
# A 1-layer ViT on 32 px images with 16-dim embeddings: the smallest open_clip config that embeds real images.
RANDOM_CLIP_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def random_clip():
    """A tiny CLIP embedder with fixed random weights: every step of CMMD runs for real in milliseconds, but its
    scores mean nothing (the embedder says so: `trustworthy` is False). Tests only; never a product option."""
    import json
    import tempfile

    import open_clip

    from metrics import ClipEmbedder

    if open_clip.get_model_config(RANDOM_CLIP) is None:
        # open_clip registers configs from JSON files only; its registry keeps the entry after the file is gone.
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{RANDOM_CLIP}.json"
            path.write_text(json.dumps(RANDOM_CLIP_CONFIG), encoding="utf-8")
            open_clip.add_model_config(path)
    return ClipEmbedder.load(RANDOM_CLIP, random_init=True, seed=0)
