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
