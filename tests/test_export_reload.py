"""The proof of an export: a fresh pipeline with `load_lora_weights(file)` computes what the trained model computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import opdiff
from pipelines.cli import main
from pipelines.config import TrainConfig
from pipelines.data import scan_dataset
from pipelines.export import export
from pipelines.model import load_pipeline
from pipelines.sample import LABEL_HEIGHT, MIN_CELL, sample
from pipelines.train import encode_dataset, train

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = [(m, 4, 4.0) for m in opdiff.METHODS] + [("lora", 4, 8.0), ("dora", 2, 8.0)]


def _fresh(bundled_model) -> StableDiffusionXLPipeline:
    """What a user does: a new pipeline from the base folder, in float32."""
    return StableDiffusionXLPipeline.from_pretrained(bundled_model, dtype=torch.float32)


@torch.no_grad()
def _unet_out(unet: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with opdiff.materialize(unet):
        return unet(**inputs).sample  # (B, 4, 8, 8)


@pytest.fixture(scope="module")
def inputs(bundled_model, bundled_data) -> dict:
    """Fixed U-Net inputs: real SDXL conditioning of two demo captions, seeded latents, two timesteps."""
    pipe = load_pipeline(bundled_model, device="cpu")
    dataset = scan_dataset(bundled_data)
    dataset.examples = dataset.examples[:2]
    enc = encode_dataset(pipe, dataset, 64)
    return {
        "sample": torch.randn(enc.latents.shape, generator=torch.Generator().manual_seed(1)),  # (2, 4, 8, 8)
        "timestep": torch.tensor([250, 750]),
        "encoder_hidden_states": enc.prompt_embeds,  # (2, 77, D)
        "added_cond_kwargs": {"text_embeds": enc.pooled, "time_ids": enc.time_ids},
    }


@pytest.mark.parametrize(("method", "rank", "alpha"), CASES)
def test_exported_lora_reloads_to_the_trained_model(method, rank, alpha, bundled_model, demo_subset, inputs,
                                                    quick_settings, tmp_path):
    # A large learning rate so the adapter moves the output far more than the reload tolerance.
    cfg = TrainConfig(data=demo_subset(2), output_dir=tmp_path / "run", rank=rank, alpha=alpha, max_steps=3, lr=1e-2,
                      **quick_settings(method))
    run_dir = train(cfg)
    lora_file = run_dir / "lora.safetensors"

    # The trained model as training held it: base + uncollapsed adapter state (MLPs, cores, ...).
    trained = load_pipeline(bundled_model, device="cpu").unet
    base_out = _unet_out(trained, inputs)
    opdiff.inject(trained, cfg.adapter_config())
    opdiff.load_training_state_dict(trained, load_file(run_dir / "adapter_training.safetensors"))
    trained_out = _unet_out(trained, inputs)
    assert (trained_out - base_out).abs().max() > 1e-3, "training did not change the model; the test would be vacuous"

    pipe = _fresh(bundled_model)
    pipe.load_lora_weights(str(lora_file))
    loaded_out = _unet_out(pipe.unet, inputs)
    assert (loaded_out - trained_out).abs().max() < 1e-5

    with safe_open(str(lora_file), framework="pt") as f:
        meta = f.metadata()
    lora_meta = json.loads(meta["lora_adapter_metadata"])
    assert meta["opdiff_method"] == method and meta["opdiff_version"] == opdiff.__version__
    assert (lora_meta["unet.r"], lora_meta["unet.lora_alpha"]) == (rank, alpha)
    assert lora_meta["unet.use_dora"] == opdiff.METHODS[method].use_dora
    assert json.loads(meta["opdiff_adapter"])["alpha"] == alpha
    assert json.loads(meta["opdiff_config"])["train"]["method"] == method

    # Byte-level format: what diffusers' own save_lora_weights writes for the same collapsed adapter.
    opdiff.collapse(trained)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "reference",
        unet_lora_layers=get_peft_model_state_dict(trained),
        unet_lora_adapter_metadata=trained.peft_config["default"].to_dict(),
    )
    reference = tmp_path / "reference" / "pytorch_lora_weights.safetensors"
    ours, theirs = load_file(lora_file), load_file(reference)
    assert sorted(ours) == sorted(theirs)
    assert any(k.endswith(".lora_magnitude_vector") for k in ours) == opdiff.METHODS[method].use_dora
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    with safe_open(str(reference), framework="pt") as f:
        reference_meta = json.loads(f.metadata()["lora_adapter_metadata"])
    # diffusers writes the target_modules set in hash order; opdiff sorts it so equal runs write equal files.
    reference_meta["unet.target_modules"] = sorted(reference_meta["unet.target_modules"])
    assert reference_meta == lora_meta


def test_alpha_metadata_is_what_sets_the_scale(bundled_model, demo_subset, inputs, tmp_path):
    """Without the header's LoraConfig, alpha=8 at rank 4 loads at scale 1 instead of 2: the metadata matters."""
    cfg = TrainConfig(data=demo_subset(2), output_dir=tmp_path / "run", rank=4, alpha=8.0, max_steps=3, lr=1e-2)
    lora_file = train(cfg) / "lora.safetensors"
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(lora_file), stripped, metadata={"format": "pt"})

    outs = []
    for path in (lora_file, stripped):
        pipe = _fresh(bundled_model)
        pipe.load_lora_weights(str(path))
        outs.append(_unet_out(pipe.unet, inputs))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_cli_export_rebuilds_from_the_run_in_half_precision(bundled_model, demo_subset, tmp_path):
    cfg = TrainConfig(data=demo_subset(1), output_dir=tmp_path / "run", method="op-dora", max_steps=2, lr=1e-2)
    run_dir = train(cfg)
    out = tmp_path / "half.safetensors"
    assert main(["export", str(run_dir), "--dtype", "float16", "--out", str(out)]) == 0
    half, full = load_file(out), load_file(run_dir / "lora.safetensors")
    assert sorted(half) == sorted(full)
    for key, value in half.items():
        assert value.dtype == torch.float16
        torch.testing.assert_close(value.float(), full[key], rtol=1e-3, atol=1e-4)


def test_non_finite_adapters_are_not_exported(bundled_model, tmp_path):
    unet = load_pipeline(bundled_model, device="cpu").unet
    opdiff.inject(unet, opdiff.AdapterConfig(method="op-lora"))
    layer = opdiff.adapted_layers(unet)[3]
    with torch.no_grad():
        opdiff.collapse(unet)
        layer.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"refusing to export: 1 tensor\(s\) hold NaN/inf .*{layer.name}\.lora_B"):
        export(unet, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_export_of_an_unfinished_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        export(tmp_path, tmp_path / "out.safetensors")


def test_demo_trains_samples_and_exports(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    run_dir = tmp_path / "demo"
    for name in ("config.json", "losses.csv", "lora.safetensors", "samples.png"):
        assert (run_dir / name).is_file() and str(run_dir / name) in printed
    assert len((run_dir / "losses.csv").read_text().splitlines()) == 1 + 2 * 24  # header + 2 epochs of 24 images


def test_sample_grid_compares_base_and_adapters_on_the_same_noise(bundled_model, demo_subset, tmp_path):
    cfg = TrainConfig(data=demo_subset(2), output_dir=tmp_path / "run", method="op-lora", max_steps=3, lr=1e-2,
                      sample_steps=3)
    run_dir = train(cfg)
    grid_file = sample(run_dir, prompts=["a red circle", "a blue square"], seeds=[0, 1])
    assert grid_file == run_dir / "samples.png"
    grid = np.asarray(Image.open(grid_file).convert("RGB"), dtype=np.int16)
    cell, label = MIN_CELL, LABEL_HEIGHT
    assert grid.shape == (label + 4 * (label + cell), 2 * cell, 3)  # rows: 2 prompts x 2 seeds; columns: base, lora
    top = label + label  # first row's images
    base, adapted = grid[top : top + cell, :cell], grid[top : top + cell, cell:]
    assert np.abs(base - adapted).mean() > 0.5, "adapter had no visible effect"

    # A base model with the same LoRA twice: three columns, both adapter columns identical (same noise, same file).
    lora = run_dir / "lora.safetensors"
    out = sample(bundled_model, ["a red circle"], [0], tmp_path / "three.png", loras=[lora, lora], steps=3)
    three = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert three.shape == (label + label + cell, 3 * cell, 3)
    row = three[2 * label :]
    assert np.array_equal(row[:, cell : 2 * cell], row[:, 2 * cell :])
    assert np.array_equal(row[:, :cell], base)  # the base column is the same image in both grids (seed 0)
