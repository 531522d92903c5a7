"""The proof of an export: a fresh pipeline with `load_lora_weights(file)` computes what the trained model computes.

Every method is trained once (module-scoped fixture) and its run's two files, diffusers and kohya format, are
each loaded into a fresh `StableDiffusionXLPipeline` the way a user would.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import opdiff
from pipelines.cli import main
from pipelines.config import TrainConfig
from pipelines.data import scan_dataset
from pipelines.encoding import encode_dataset
from pipelines.export import KINDS, export
from pipelines.kohya import kohya_names
from pipelines.model import load_pipeline
from pipelines.rundir import RunDir
from pipelines.sample import LABEL_HEIGHT, MIN_CELL, SampleConfig, default_grid_path, sample, save_grid
from pipelines.train import train

pytestmark = pytest.mark.usefixtures("module_single_thread", "single_thread", "shared_pipeline")

CASES = [(m, 4, 4.0) for m in opdiff.METHODS] + [("lora", 4, 8.0), ("dora", 2, 8.0)]
LORA_FILE = RunDir.LORA
KOHYA_FILE, LYCORIS_FILE = (f"lora{KINDS[k].suffix}.safetensors" for k in ("kohya", "lycoris"))
FILES = ("diffusers", "kohya")


def _file(method: str, fmt: str) -> str:
    """The run folder's file of a format: a DoRA method's kohya-keyed file with DoRA's own formula is the LyCORIS one
    (its other kohya-keyed files are proven per loader in test_export_dora.py)."""
    if fmt == "diffusers":
        return LORA_FILE
    return LYCORIS_FILE if opdiff.METHODS[method].use_dora else KOHYA_FILE


@dataclass
class Trained:
    """One trained run and what its model computed before export."""

    method: str
    rank: int
    alpha: float
    run_dir: Path
    unet: nn.Module
    """The trained U-Net, collapsed after `out` and `image` were computed from its uncollapsed state."""
    out: torch.Tensor  # (2, 4, 8, 8): U-Net output on `inputs`
    image: np.ndarray  # (64, 64, 3): `_image` of the trained pipeline


def _fresh(bundled_model) -> StableDiffusionXLPipeline:
    """What a user does: a new pipeline from the base folder, in float32."""
    return StableDiffusionXLPipeline.from_pretrained(bundled_model, dtype=torch.float32)


@torch.no_grad()
def _unet_out(unet: nn.Module, inputs: dict) -> torch.Tensor:
    with opdiff.materialize(unet):
        return unet(**inputs).sample  # (B, 4, 8, 8)


def _image(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    """A 2-step generation from seed 0 (with classifier-free guidance): (64, 64, 3) floats in [0, 1]."""
    with opdiff.materialize(pipe.unet):
        return pipe("a red circle on a blue square", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def _load(bundled_model, file: Path) -> StableDiffusionXLPipeline:
    """A fresh pipeline with `file` loaded; a kohya DoRA file is finished the way LyCORIS and ComfyUI apply it."""
    pipe = _fresh(bundled_model)
    pipe.load_lora_weights(str(file))
    scales = {k.removesuffix(".dora_scale"): v for k, v in load_file(file).items() if k.endswith(".dora_scale")}
    if scales:
        _apply_dora_scale(pipe, scales)
    return pipe


@torch.no_grad()
def _apply_dora_scale(pipe: StableDiffusionXLPipeline, scales: dict[str, torch.Tensor]) -> None:
    """diffusers skips `dora_scale`; apply it as LyCORIS does for its output-axis layout (d_out, 1):
    W = dora_scale * W' / ||W'||_row, with W' = W0 + alpha / r * up @ down as diffusers loaded it."""
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused W' in the plain Linear layers
    modules = dict(pipe.unet.named_modules())
    attention_linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and ".attentions." in n]
    module_of = {kohya: name for name, kohya in kohya_names(pipe.unet.config, attention_linears).items()}
    for kohya, scale in scales.items():
        weight = modules[module_of[kohya]].weight  # (d_out, d_in)
        weight.mul_(scale / weight.norm(dim=1, keepdim=True))


def _data(source: Path, out: Path, n: int) -> Path:
    """A folder with the first n bundled images and captions."""
    out.mkdir(parents=True)
    for image in sorted(source.glob("*.png"))[:n]:
        shutil.copy(image, out / image.name)
        shutil.copy(image.with_suffix(".txt"), out / image.with_suffix(".txt").name)
    return out


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


@pytest.fixture(scope="module")
def base(bundled_model, inputs) -> tuple[torch.Tensor, np.ndarray]:
    """The base model's U-Net output on `inputs` and its `_image`."""
    pipe = _fresh(bundled_model)
    return _unet_out(pipe.unet, inputs), _image(pipe)


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-r{r}-a{a:g}" for m, r, a in CASES])
def trained(request, tmp_path_factory, bundled_model, bundled_data, inputs, quick_settings) -> Trained:
    """A 3-step run of (method, rank, alpha) at a large learning rate, so the adapter moves the output far more
    than the reload tolerance; and what the trained model computes, held as training held it (uncollapsed)."""
    method, rank, alpha = request.param
    root = tmp_path_factory.mktemp(f"{method}-r{rank}")
    core_rate = {"mpo_lr_power": 0.0, "mpo_lr_cap": 0.0} if method.startswith("lora-over") else {}  # cores at lr: a visible move
    cfg = TrainConfig(data=_data(bundled_data, root / "data", 2), output_dir=root / "run", rank=rank, alpha=alpha,
                      max_steps=3, lr=1e-2, **quick_settings(method), **core_rate)
    run_dir = train(cfg)
    pipe = load_pipeline(bundled_model, device="cpu")
    opdiff.inject(pipe.unet, cfg.adapter)
    opdiff.load_training_state_dict(pipe.unet, load_file(run_dir / "adapter_training.safetensors"))
    out, image = _unet_out(pipe.unet, inputs), _image(pipe)
    opdiff.collapse(pipe.unet)
    return Trained(method, rank, alpha, run_dir, pipe.unet, out, image)


@pytest.mark.parametrize("fmt", FILES)
def test_exported_file_reloads_to_the_trained_model(fmt, trained, base, bundled_model, inputs):
    base_out, base_image = base
    assert (trained.out - base_out).abs().max() > 1e-3, "training did not change the model; the test would be vacuous"
    assert np.abs(trained.image - base_image).max() > 1e-2, "the adapter does not change the image"

    pipe = _load(bundled_model, trained.run_dir / _file(trained.method, fmt))
    assert (_unet_out(pipe.unet, inputs) - trained.out).abs().max() < 1e-5
    np.testing.assert_allclose(_image(pipe), trained.image, rtol=0, atol=1e-5)


def test_headers_describe_the_run(trained):
    run_config = json.loads((trained.run_dir / "config.json").read_text())
    use_dora = opdiff.METHODS[trained.method].use_dora
    headers = {}
    for fmt in FILES:
        with safe_open(str(trained.run_dir / _file(trained.method, fmt)), framework="pt") as f:
            headers[fmt] = f.metadata()
        meta = headers[fmt]
        assert meta["opdiff_method"] == trained.method and meta["opdiff_version"] == opdiff.__version__
        assert (meta["opdiff_rank"], meta["opdiff_alpha"]) == (str(trained.rank), str(trained.alpha))
        assert json.loads(meta["opdiff_targets"]) == run_config["adapter"]["target_modules"]
        assert meta["opdiff_base"] == "tiny-sdxl"  # named, not located (run_config["base"] is an absolute path)
        assert meta["opdiff_dataset_hash"] == run_config["dataset"]["hash"]
        assert (meta["opdiff_steps"], meta["opdiff_resolution"]) == ("3", "64")
        assert json.loads(meta["opdiff_adapter"])["alpha"] == trained.alpha
        assert json.loads(meta["opdiff_config"])["train"]["method"] == trained.method
        assert "opdiff_cmmd" not in meta  # not measured
    lora_meta = json.loads(headers["diffusers"]["lora_adapter_metadata"])
    assert (lora_meta["unet.r"], lora_meta["unet.lora_alpha"]) == (trained.rank, trained.alpha)
    assert lora_meta["unet.use_dora"] == use_dora
    kohya_meta = headers["kohya"]
    assert kohya_meta["ss_network_module"] == ("lycoris.kohya" if use_dora else "networks.lora")
    assert (kohya_meta["ss_network_dim"], kohya_meta["ss_network_alpha"]) == (str(trained.rank), str(trained.alpha))
    assert (kohya_meta["ss_base_model_version"], kohya_meta["ss_steps"]) == ("sdxl_base_v1-0", "3")
    assert kohya_meta["ss_resolution"] == "(64, 64)" and kohya_meta["ss_sd_model_name"] == "tiny-sdxl"

    # The kohya tensors are the diffusers tensors under other names: down = A, up = B, dora_scale = m as a column.
    diffusers, kohya = load_file(trained.run_dir / LORA_FILE), load_file(trained.run_dir / _file(trained.method, "kohya"))
    layers = opdiff.adapted_layers(trained.unet)
    names = kohya_names(trained.unet.config, [a.name for a in layers])
    assert len(kohya) == len(layers) * (4 if use_dora else 3)
    for a in layers:
        k, d = names[a.name], f"unet.{a.name}"
        assert torch.equal(kohya[f"{k}.lora_down.weight"], diffusers[f"{d}.lora_A.weight"])  # (r, d_in)
        assert torch.equal(kohya[f"{k}.lora_up.weight"], diffusers[f"{d}.lora_B.weight"])  # (d_out, r)
        assert kohya[f"{k}.alpha"].shape == () and kohya[f"{k}.alpha"].item() == trained.alpha
        if use_dora:
            assert torch.equal(kohya[f"{k}.dora_scale"], diffusers[f"{d}.lora_magnitude_vector"][:, None])


def test_diffusers_file_is_what_save_lora_weights_writes(trained, tmp_path):
    lora_file = trained.run_dir / LORA_FILE
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "reference",
        unet_lora_layers=get_peft_model_state_dict(trained.unet),
        unet_lora_adapter_metadata=trained.unet.peft_config["default"].to_dict(),
    )
    reference = tmp_path / "reference" / "pytorch_lora_weights.safetensors"
    ours, theirs = load_file(lora_file), load_file(reference)
    assert sorted(ours) == sorted(theirs)
    assert any(k.endswith(".lora_magnitude_vector") for k in ours) == opdiff.METHODS[trained.method].use_dora
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    with safe_open(str(reference), framework="pt") as f:
        reference_meta = json.loads(f.metadata()["lora_adapter_metadata"])
    with safe_open(str(lora_file), framework="pt") as f:
        lora_meta = json.loads(f.metadata()["lora_adapter_metadata"])
    # diffusers writes the target_modules set in hash order; opdiff sorts it so equal runs write equal files.
    reference_meta["unet.target_modules"] = sorted(reference_meta["unet.target_modules"])
    assert reference_meta == lora_meta


def _strip_alpha(file: Path, out: Path) -> Path:
    """`file` without what carries alpha: the diffusers header's LoraConfig, or kohya's `.alpha` tensors."""
    tensors = {k: v for k, v in load_file(file).items() if not k.endswith(".alpha")}
    save_file(tensors, out, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("trained", [("lora", 4, 8.0)], indirect=True, ids=["lora-r4-a8"])
@pytest.mark.parametrize("fmt", FILES)
def test_alpha_is_what_sets_the_scale(fmt, trained, bundled_model, inputs, tmp_path):
    """Without its alpha, alpha=8 at rank 4 loads at scale 1 instead of 2: the file must carry it."""
    lora_file = trained.run_dir / _file(trained.method, fmt)
    stripped = _strip_alpha(lora_file, tmp_path / "stripped.safetensors")
    outs = [_unet_out(_load(bundled_model, path).unet, inputs) for path in (lora_file, stripped)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("trained", [("op-dora", 4, 4.0)], indirect=True, ids=["op-dora-r4-a4"])
def test_cli_export_rebuilds_from_the_run_in_half_precision(trained, tmp_path, capsys):
    out = tmp_path / "half.safetensors"
    assert main(["export", str(trained.run_dir), "--dtype", "float16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    pairs = [(out, LORA_FILE)] + [(tmp_path / f"half_{kind}.safetensors", f"lora_{kind}.safetensors")
                                  for kind in ("lycoris", "comfyui", "a1111")]
    assert all(f"{half_file}\n    for " in printed for half_file, _ in pairs)
    assert sorted(tmp_path.iterdir()) == sorted(half_file for half_file, _ in pairs)
    for half_file, name in pairs:
        half, full = load_file(half_file), load_file(trained.run_dir / name)
        assert sorted(half) == sorted(full)
        for key, value in half.items():
            # alpha stays float32 in every file: it is a scale, and half precision would round e.g. 0.3
            assert value.dtype == (torch.float32 if key.endswith(".alpha") else torch.float16)
            torch.testing.assert_close(value.float(), full[key], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "both"])
def test_non_finite_adapters_are_not_exported(fmt, bundled_model, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(bundled_model / "unet")
    opdiff.inject(unet, opdiff.AdapterConfig(method="op-lora"))
    layer = opdiff.adapted_layers(unet)[3]
    with torch.no_grad():
        opdiff.collapse(unet)
        layer.lora_B.weight[0, 0] = float("nan")
    bad = f"{kohya_names(unet.config, [layer.name])[layer.name]}.lora_up" if fmt == "kohya" else f"{layer.name}.lora_B"
    with pytest.raises(ValueError, match=rf"refusing to export: 1 tensor\(s\) hold NaN/inf .*first: \S*{bad}"):
        export(unet, tmp_path / "bad.safetensors", format=fmt)
    assert not list(tmp_path.iterdir()), "a refused export wrote a file"


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
    comparison = sample(SampleConfig(str(run_dir), prompt=("a red circle", "a blue square"), seed=(0, 1)))
    assert comparison.titles == ["base", f"op-lora: {run_dir.name}"]
    assert [label for label, _ in comparison.rows] == ["seed 0: a red circle", "seed 1: a red circle",
                                                       "seed 0: a blue square", "seed 1: a blue square"]
    assert all(len(images) == 2 for _, images in comparison.rows)
    first_base, first_adapted = (np.asarray(im, dtype=np.int16) for im in comparison.rows[0][1])
    assert np.abs(first_base - first_adapted).mean() > 0.5, "adapter had no visible effect"

    grid_file = save_grid(comparison, default_grid_path(SampleConfig(str(run_dir))))
    assert grid_file == run_dir / "samples.png"
    grid = np.asarray(Image.open(grid_file).convert("RGB"), dtype=np.int16)
    cell, label = MIN_CELL, LABEL_HEIGHT
    assert grid.shape == (label + 4 * (label + cell), 2 * cell, 3)  # rows: 2 prompts x 2 seeds; columns: base, lora
    top = label + label  # first row's images
    base, adapted = grid[top : top + cell, :cell], grid[top : top + cell, cell:]
    assert np.abs(base - adapted).mean() > 0.5, "adapter had no visible effect"

    # A base model with the same LoRA twice: three columns, both adapter columns identical (same noise, same file).
    lora = run_dir / "lora.safetensors"
    three = sample(SampleConfig(str(bundled_model), prompt=("a red circle",), seed=(0,), lora=(lora, lora), steps=3))
    assert len(three.titles) == 3 and len(three.rows) == 1
    images = [np.asarray(im) for im in three.rows[0][1]]
    assert np.array_equal(images[1], images[2])
    assert np.array_equal(images[0], np.asarray(comparison.rows[0][1][0]))  # the same base image for seed 0
