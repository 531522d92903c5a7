"""A DoRA run's files, each in the loader it is meant for, against the trained model.

No `dora_scale` is read the same by every loader, so a DoRA run ships one file per loader family. Each test loads
its file with that loader's own code where it is installable (diffusers, LyCORIS) or with the loader's formula
re-derived here from its source (ComfyUI: `comfy/weight_adapter/lora.py` + `base.py` `weight_decompose`;
AUTOMATIC1111: `extensions-builtin/Lora/network_lora.py` + `network.py` `apply_weight_decompose`), and compares
the U-Net's output with what the trained model computes. Run with `-s` to see the measured figures.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from lycoris.kohya import create_network_from_weights
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import opdiff
from pipelines.cli import main
from pipelines.config import TrainConfig
from pipelines.export import KINDS
from pipelines.kohya import kohya_names
from pipelines.model import load_pipeline
from pipelines.rundir import RunDir
from pipelines.train import train

LORA_FILE = RunDir.LORA
LYCORIS_FILE, COMFYUI_FILE, A1111_FILE = (f"lora{KINDS[k].suffix}.safetensors" for k in ("lycoris", "comfyui", "a1111"))

pytestmark = pytest.mark.usefixtures("module_single_thread", "single_thread")

DORA_METHODS = [m for m, spec in opdiff.METHODS.items() if spec.use_dora]
RANK, ALPHA = 4, 8.0  # alpha != rank: a loader that drops alpha / r is caught
EXACT = 1e-5  # max |output difference| that counts as reproducing the trained model (float32 rounding)
COMFYUI_EPS = torch.finfo(torch.float32).eps  # ComfyUI patches in float32 and adds its eps to the norm


def test_the_dora_methods_are_the_ones_tested():
    assert DORA_METHODS == ["dora", "op-dora"]


@dataclass
class Trained:
    method: str
    run_dir: Path
    out: torch.Tensor  # (2, 4, 8, 8): the trained model's U-Net output on `inputs`
    effect: float  # max |trained - base| output: what the adapter does


@pytest.fixture(scope="module")
def inputs(bundled_model) -> dict:
    """Seeded U-Net inputs of the bundled model's sizes: latents, two timesteps, text states, pooled, time ids."""
    config = json.loads((bundled_model / "unet" / "config.json").read_text())
    generator = torch.Generator().manual_seed(1)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([250, 750]),
        "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], generator=generator),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=generator),
                              "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)},
    }


@torch.no_grad()
def _out(unet: nn.Module, inputs: dict) -> torch.Tensor:
    with opdiff.materialize(unet):
        return unet(**inputs).sample


def _fresh(bundled_model) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(bundled_model, dtype=torch.float32)


@pytest.fixture(scope="module", params=DORA_METHODS)
def trained(request, tmp_path_factory, bundled_model, bundled_data, inputs) -> Trained:
    """A 3-step run at a large learning rate; the trained model's output held as training held it (uncollapsed)."""
    root = tmp_path_factory.mktemp(request.param)
    (root / "data").mkdir()
    for image in sorted(bundled_data.glob("*.png"))[:2]:
        for file in (image, image.with_suffix(".txt")):
            shutil.copy(file, root / "data" / file.name)
    cfg = TrainConfig(data=root / "data", output_dir=root / "run", method=request.param, rank=RANK, alpha=ALPHA,
                      max_steps=3, lr=1e-2)
    run_dir = train(cfg)
    pipe = load_pipeline(bundled_model, device="cpu")
    base_out = _out(pipe.unet, inputs)
    opdiff.inject(pipe.unet, cfg.adapter)
    opdiff.load_training_state_dict(pipe.unet, load_file(run_dir / "adapter_training.safetensors"))
    out = _out(pipe.unet, inputs)
    effect = (out - base_out).abs().max().item()
    assert effect > 100 * EXACT, "training did not change the model; the test would be vacuous"
    return Trained(request.param, run_dir, out, effect)


def _report(trained: Trained, what: str, error: float) -> None:
    print(f"\n{trained.method}: {what}: max |output error| {error:.3g} ({error / trained.effect:.3g} of the "
          f"adapter's effect {trained.effect:.3g})")


def _sgm_view(unet: UNet2DConditionModel) -> nn.Module:
    """The diffusers U-Net's attention blocks under the module names of sd-scripts' SGM U-Net (which LyCORIS names
    its `lora_unet_*` modules after), by DESIGN.md's closed form, n = layers_per_block + 1: down i, j ->
    input_blocks.{n i + j + 1}.1, mid -> middle_block.1, up i, j -> output_blocks.{n i + j}.1. The modules are
    shared, so what LyCORIS patches is the U-Net's own."""
    n = unet.config.layers_per_block + 1
    view = nn.Module()
    view.input_blocks, view.output_blocks = nn.ModuleDict(), nn.ModuleDict()
    for i, block in enumerate(unet.down_blocks):
        for j, attention in enumerate(getattr(block, "attentions", None) or []):
            view.input_blocks[str(n * i + j + 1)] = nn.ModuleDict({"1": attention})
    view.middle_block = nn.ModuleDict({"1": unet.mid_block.attentions[0]})
    for i, block in enumerate(unet.up_blocks):
        for j, attention in enumerate(getattr(block, "attentions", None) or []):
            view.output_blocks[str(n * i + j)] = nn.ModuleDict({"1": attention})
    return view


def _modules_by_kohya_name(unet: UNet2DConditionModel) -> dict[str, nn.Linear]:
    linears = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".attentions." in n}
    return {kohya: linears[name] for name, kohya in kohya_names(unet.config, linears).items()}


def _layers(file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya layer name: {"lora_down.weight": ..., "lora_up.weight": ..., "alpha": ..., "dora_scale": ...}}."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(file).items():
        name, _, part = key.partition(".")
        layers.setdefault(name, {})[part] = value.float()
    return layers


@torch.no_grad()
def _with_formula(bundled_model, file: Path, formula) -> UNet2DConditionModel:
    """A fresh U-Net whose adapted weights are `formula(W0, up, down, alpha, dora_scale)` for each layer of `file`."""
    unet = _fresh(bundled_model).unet
    modules = _modules_by_kohya_name(unet)
    for name, t in _layers(file).items():
        weight = modules[name].weight  # (d_out, d_in)
        weight.copy_(formula(weight.clone(), t["lora_up.weight"], t["lora_down.weight"], t["alpha"].item(),
                             t.get("dora_scale")))
    return unet


def comfyui_formula(w0, up, down, alpha, dora_scale):
    """ComfyUI's LoRA patch (LoRAAdapter.calculate_weight, strength 1): alpha / down.shape[0] times up @ down, then
    `weight_decompose`: an output-axis dora_scale (shape[0] == d_out) is divided by the *base* row norm."""
    weight_calc = w0 + alpha / down.shape[0] * (up @ down)
    if dora_scale is None:
        return weight_calc
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = w0.norm(dim=1, keepdim=True)  # (d_out, 1)
    else:
        norm = weight_calc.norm(dim=0, keepdim=True)  # (1, d_in)
    return weight_calc * (dora_scale / (norm + COMFYUI_EPS))


def a1111_formula(w0, up, down, alpha, dora_scale):
    """AUTOMATIC1111's LoRA (network_lora.py: up @ down * alpha / dim) and `apply_weight_decompose`, which always
    divides by the column norms (1, d_in); a (d_out, 1) dora_scale broadcasts to (d_out, d_in)."""
    merged = w0 + alpha / down.shape[0] * (up @ down)
    if dora_scale is None:
        return merged
    return merged * (dora_scale / merged.norm(dim=0, keepdim=True))


def _dora_weights(bundled_model, run_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{kohya name: (W0, W)} with W = m * (W0 + s B A) / ||W0 + s B A||_row from the diffusers file's A, B, m
    (PEFT's DoRA, exact in diffusers: test_export_reload.py)."""
    unet = _fresh(bundled_model).unet
    tensors = load_file(run_dir / LORA_FILE)
    modules = dict(unet.named_modules())
    names = kohya_names(unet.config, [k.removeprefix("unet.").removesuffix(".lora_A.weight")
                                      for k in tensors if k.endswith(".lora_A.weight")])
    out = {}
    for module, kohya in names.items():
        w0 = modules[module].weight.detach().clone()
        a, b = tensors[f"unet.{module}.lora_A.weight"], tensors[f"unet.{module}.lora_B.weight"]
        m = tensors[f"unet.{module}.lora_magnitude_vector"]
        adapted = w0 + ALPHA / RANK * b @ a
        out[kohya] = (w0, adapted * (m / adapted.norm(dim=1))[:, None])
    return out


def test_every_file_of_a_dora_run_says_which_programs_it_is_for(trained):
    expected = {LORA_FILE: "diffusers", LYCORIS_FILE: "lycoris", COMFYUI_FILE: "comfyui", A1111_FILE: "a1111"}
    exported = {p.name for p in trained.run_dir.glob("lora*.safetensors")}
    assert exported == set(expected)
    for name, kind in expected.items():
        with safe_open(str(trained.run_dir / name), framework="pt") as f:
            meta = f.metadata()
        assert meta["opdiff_file"] == kind and meta["opdiff_for"] and meta["opdiff_exactness"], name
    for name in (LYCORIS_FILE, COMFYUI_FILE):
        assert all(v.shape == (v.shape[0], 1) for k, v in load_file(trained.run_dir / name).items()
                   if k.endswith(".dora_scale"))


def test_diffusers_file_in_diffusers(trained, bundled_model, inputs):
    pipe = _fresh(bundled_model)
    pipe.load_lora_weights(str(trained.run_dir / LORA_FILE))
    error = (_out(pipe.unet, inputs) - trained.out).abs().max().item()
    _report(trained, "lora.safetensors in diffusers", error)
    assert error < EXACT


def test_lycoris_file_in_lycoris(trained, bundled_model, inputs):
    """LyCORIS's own loader, as sd-scripts runs a `lycoris.kohya` network: weights from the file, modules found by
    their `lora_unet_<SGM path>` names, DoRA applied in its forward."""
    pipe = _fresh(bundled_model)
    view = _sgm_view(pipe.unet)
    network, _ = create_network_from_weights(1.0, str(trained.run_dir / LYCORIS_FILE), None, None, view,
                                             for_inference=True)
    assert len(network.unet_loras) == len(_layers(trained.run_dir / LYCORIS_FILE)) > 0  # every layer matched
    assert all(lora.wd and lora.wd_on_out for lora in network.unet_loras)  # read as output-axis DoRA
    network.apply_to(None, view, apply_text_encoder=False, apply_unet=True)
    error = (_out(pipe.unet, inputs) - trained.out).abs().max().item()
    _report(trained, "lora_lycoris.safetensors in LyCORIS", error)
    assert error < EXACT


def test_comfyui_file_with_comfyuis_formula(trained, bundled_model, inputs):
    comfy = _with_formula(bundled_model, trained.run_dir / COMFYUI_FILE, comfyui_formula)
    error = (_out(comfy, inputs) - trained.out).abs().max().item()
    _report(trained, "lora_comfyui.safetensors in ComfyUI's formula", error)
    assert error < EXACT
    # The LyCORIS file, exact in LyCORIS, is not in ComfyUI: the reason the ComfyUI file exists.
    lycoris_in_comfy = _with_formula(bundled_model, trained.run_dir / LYCORIS_FILE, comfyui_formula)
    wrong = (_out(lycoris_in_comfy, inputs) - trained.out).abs().max().item()
    _report(trained, "lora_lycoris.safetensors in ComfyUI's formula (not its loader)", wrong)
    assert wrong > 100 * EXACT


def test_the_lycoris_file_is_wrong_in_a1111_and_diffusers_kohya_path(trained, bundled_model, inputs):
    """Why the a1111 file exists: AUTOMATIC1111 divides by column norms and diffusers drops `dora_scale`."""
    a1111 = _with_formula(bundled_model, trained.run_dir / LYCORIS_FILE, a1111_formula)
    wrong = (_out(a1111, inputs) - trained.out).abs().max().item()
    _report(trained, "lora_lycoris.safetensors in AUTOMATIC1111's formula (not its loader)", wrong)
    pipe = _fresh(bundled_model)
    pipe.load_lora_weights(str(trained.run_dir / LYCORIS_FILE))
    dropped = (_out(pipe.unet, inputs) - trained.out).abs().max().item()
    _report(trained, "lora_lycoris.safetensors in diffusers (not its loader)", dropped)
    assert min(wrong, dropped) > 100 * EXACT


@pytest.mark.parametrize("svd_rank", [None, 2], ids=["default-rank", "rank-2"])
def test_a1111_file_is_a_plain_lora_within_its_recorded_error(svd_rank, trained, bundled_model, inputs, tmp_path):
    """Plain-LoRA maths (AUTOMATIC1111's, and diffusers' kohya loader, which fuses exactly that) give a weight whose
    distance from DoRA's is the error the file records, layer by layer and over all layers."""
    if svd_rank is None:
        file = trained.run_dir / A1111_FILE
    else:
        file = tmp_path / "low.safetensors"
        assert main(["export", str(trained.run_dir), "--format", "a1111", "--svd-rank", str(svd_rank),
                     "--out", str(file)]) == 0
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    rank = int(meta["opdiff_svd_rank"])
    assert rank == (svd_rank or 32) and meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(rank), str(float(rank)))
    layers = _layers(file)
    assert all("dora_scale" not in t for t in layers.values())
    recorded = json.loads(meta["opdiff_svd_layer_errors"])
    dora = _dora_weights(bundled_model, trained.run_dir)
    assert recorded.keys() == layers.keys() == dora.keys()
    residual_sq = update_sq = 0.0
    for name, t in layers.items():
        w0, w = dora[name]
        assert t["lora_down.weight"].shape[0] == min(rank, *w.shape)
        plain = a1111_formula(w0, t["lora_up.weight"], t["lora_down.weight"], t["alpha"].item(), None)
        residual, update = (plain - w).norm().item(), (w - w0).norm().item()
        assert residual / update == pytest.approx(recorded[name], rel=1e-3, abs=1e-6), name
        residual_sq, update_sq = residual_sq + residual**2, update_sq + update**2
    total = (residual_sq / update_sq) ** 0.5
    assert total == pytest.approx(float(meta["opdiff_svd_relative_error"]), rel=1e-3, abs=1e-6)
    assert f"relative error {float(meta['opdiff_svd_relative_error']):.4g}" in meta["opdiff_exactness"]

    pipe = _fresh(bundled_model)
    pipe.load_lora_weights(str(file))  # diffusers' kohya path: plain LoRA maths
    error = (_out(pipe.unet, inputs) - trained.out).abs().max().item()
    in_a1111 = (_out(_with_formula(bundled_model, file, a1111_formula), inputs) - trained.out).abs().max().item()
    _report(trained, f"{file.name} (rank {rank}, recorded relative weight error {total:.3g}) in diffusers", error)
    assert in_a1111 == pytest.approx(error, rel=1e-3, abs=1e-6)
    if svd_rank is None:  # rank 32 covers the bundled model's widest layer (32 x 48): exact
        assert total < 1e-5 and error < 1e-4
    else:  # rank 2 leaves an error, and it is the one recorded (checked above)
        assert total > 1e-3


def test_kohya_keyed_dora_files_carry_sd_scripts_hashes(trained):
    for name in (LYCORIS_FILE, COMFYUI_FILE, A1111_FILE):
        file = trained.run_dir / name
        data = file.read_bytes()
        header = int.from_bytes(data[:8], "little")
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata()
        # AUTOMATIC1111's `addnet_hash_safetensors`: SHA-256 of everything after the header.
        assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header :]).hexdigest(), name
