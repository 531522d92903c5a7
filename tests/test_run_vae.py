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
from pipelines.sample import sample
from pipelines.train import train

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS, SEEDS, STEPS = ["a red circle"], [0], 2


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


def test_sample_and_compare_use_the_runs_vae(other_vae, bundled_model, demo_subset, tmp_path):
    run_dir = train(TrainConfig(data=demo_subset(1), output_dir=tmp_path / "run", vae=str(other_vae), max_steps=1))
    lora = [run_dir / "lora.safetensors"]
    from_run = _pixels(sample(run_dir, PROMPTS, SEEDS, tmp_path / "run.png", steps=STEPS))
    with_vae = _pixels(sample(bundled_model, PROMPTS, SEEDS, tmp_path / "vae.png", loras=lora, steps=STEPS,
                              vae=other_vae))
    base_vae = _pixels(sample(bundled_model, PROMPTS, SEEDS, tmp_path / "base.png", loras=lora, steps=STEPS))
    assert np.array_equal(from_run, with_vae)
    assert np.abs(from_run - base_vae).mean() > 1.0, "the VAE made no difference; the test would be vacuous"
    compared = jobs.compare_runs([run_dir], tmp_path / "compare", PROMPTS, SEEDS, STEPS)
    assert np.array_equal(_pixels(compared.grid), from_run)
