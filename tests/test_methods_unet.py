"""Every method on the bundled SDXL-architecture U-Net: the adapted model equals the base at step 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

import opdiff

UNET = Path(__file__).resolve().parent.parent / "assets" / "tiny-sdxl" / "unet"


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(UNET, torch_dtype=torch.float32)
    cfg = unet.config
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g),
                              "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)},
    }


@pytest.mark.parametrize("method", list(opdiff.METHODS))
def test_step0_unet_equals_base(method, inputs):
    base = UNet2DConditionModel.from_pretrained(UNET, torch_dtype=torch.float32)
    adapted = UNet2DConditionModel.from_pretrained(UNET, torch_dtype=torch.float32)
    opdiff.inject(adapted, opdiff.AdapterConfig(method=method))
    assert len(opdiff.adapted_layers(adapted)) > 0
    with torch.no_grad(), opdiff.materialize(adapted):
        diff = (adapted(**inputs).sample - base(**inputs).sample).abs().max().item()
    assert diff < 1e-6
