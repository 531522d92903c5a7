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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: one intra-op thread each (the tiny model gains nothing from more).
    torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def _shared_bundled_pipeline():
    """The bundled pipeline, loaded once per test process, with a fingerprint of its frozen weights."""
    from pipelines.model import fingerprint, load_pipeline

    pipe = load_pipeline(BUNDLED_MODEL, device="cpu")
    return pipe, fingerprint(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)


def _as_loaded(pipe) -> None:
    """Put the shared pipeline back as `load_pipeline` returns it: no adapter, no checkpointing, eval mode."""
    import opdiff

    unet = pipe.unet
    if getattr(unet, "opdiff_config", None) is not None:
        opdiff.remove(unet)
    unet.disable_gradient_checkpointing()
    unet.to("cpu").eval().requires_grad_(True)


@pytest.fixture
def shared_pipeline(_shared_bundled_pipeline, monkeypatch):
    """Training loads the bundled model once per session instead of once per run.

    `pipelines.train` gets the shared pipeline, put back to the base before every run, whenever it asks for the
    bundled model in float32 with its own VAE (anything else loads as usual). After the test, the frozen weights are
    checked against their fingerprint: a test that changed the base fails here.
    """
    import pipelines.train
    from pipelines.model import fingerprint

    pipe, weights = _shared_bundled_pipeline
    real = pipelines.train.load_pipeline

    def load(base, dtype=torch.float32, device=None, vae=None):
        if Path(base).resolve() != BUNDLED_MODEL.resolve() or dtype != torch.float32 or vae is not None:
            return real(base, dtype, device=device, vae=vae)
        _as_loaded(pipe)
        return pipe

    monkeypatch.setattr(pipelines.train, "load_pipeline", load)
    yield pipe
    _as_loaded(pipe)
    assert fingerprint(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) == weights, \
        "a test changed the shared pipeline's frozen weights"


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


@pytest.fixture(scope="module")
def module_single_thread() -> Iterator[None]:
    """`single_thread` for a whole module: its module-scoped fixtures (a training run) start before any test's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No CLIP weights anywhere: every cache the loader looks in points into an empty tmp folder, offline."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


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
