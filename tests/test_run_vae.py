"""A run trained with its own VAE (`--vae`) is sampled and compared with that VAE, from the CLI's `sample` and from
the GUI's compare (`jobs.compare_runs`), not with the base model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from pipelines import jobs
from pipelines.config import TrainConfig
from pipelines.sample import SampleConfig, sample, save_grid
from pipelines.train import train

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS, SEEDS, STEPS = ("a red circle",), (0,), 2


@pytest.fixture
def other_vae(bundled_model, tmp_path) -> Path:
    """The bundled VAE with its decoder's output convolution halved: the same latents decode to other images."""
    vae = AutoencoderKL.from_pretrained(bundled_model / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
    vae.save_pretrained(tmp_path / "other-vae")
    return tmp_path / "other-vae"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _grid(cfg: SampleConfig, path: Path) -> np.ndarray:
    return _pixels(save_grid(sample(cfg), path))


def test_sample_and_compare_use_the_runs_vae(other_vae, bundled_model, demo_subset, tmp_path):
    run_dir = train(TrainConfig(data=demo_subset(1), output_dir=tmp_path / "run", vae=str(other_vae), max_steps=1))
    lora = (run_dir / "lora.safetensors",)
    from_run = _grid(SampleConfig(str(run_dir), prompt=PROMPTS, seed=SEEDS, steps=STEPS), tmp_path / "run.png")
    with_vae = _grid(SampleConfig(str(bundled_model), prompt=PROMPTS, seed=SEEDS, lora=lora, steps=STEPS,
                                  vae=str(other_vae)), tmp_path / "vae.png")
    base_vae = _grid(SampleConfig(str(bundled_model), prompt=PROMPTS, seed=SEEDS, lora=lora, steps=STEPS),
                     tmp_path / "base.png")
    assert np.array_equal(from_run, with_vae)
    assert np.abs(from_run - base_vae).mean() > 1.0, "the VAE made no difference; the test would be vacuous"
    compared, _ = jobs.compare_runs([run_dir], tmp_path / "compare", PROMPTS, SEEDS, STEPS)
    run_images = sample(SampleConfig(str(run_dir), prompt=PROMPTS, seed=SEEDS, steps=STEPS)).rows[0][1]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(compared.rows[0][1], run_images,
                                                                             strict=True))
