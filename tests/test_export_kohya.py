"""The kohya format: SGM names built from the U-Net config, checked on full-size SDXL (meta device), against
diffusers' own kohya decoder and against a file written by another tool; the export command's formats and headers.

That every method's kohya file reloads to the trained model is shown in test_export_reload.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import opdiff
from pipelines.cli import main
from pipelines.config import TrainConfig
from pipelines.export import export, kohya_tensors, lora_tensors, output_files
from pipelines.kohya import kohya_names, sgm_prefixes
from pipelines.rundir import RunDir
from pipelines.train import train

pytestmark = pytest.mark.usefixtures("module_single_thread", "single_thread", "shared_pipeline")

LORA_FILE, KOHYA_FILE = RunDir.LORA, output_files(RunDir.LORA, ("diffusers", "kohya"))["kohya"].name
SDXL_CONFIG = Path(__file__).resolve().parent.parent / "assets" / "sdxl-base-1.0" / "unet" / "config.json"


@pytest.fixture(scope="module")
def sdxl_unet() -> UNet2DConditionModel:
    """The full-size SDXL base U-Net, structure only: parameters on the meta device, no weights."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(json.loads(SDXL_CONFIG.read_text()))


@pytest.fixture(scope="module")
def tiny_config(bundled_model) -> dict:
    return json.loads((bundled_model / "unet" / "config.json").read_text())


def _targeted(unet: nn.Module, targets: tuple[str, ...] = opdiff.DEFAULT_TARGETS) -> list[str]:
    """The `nn.Linear` modules `opdiff.inject` adapts for these targets (PEFT's name-suffix match)."""
    return [n for n, m in unet.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def _transformer_blocks(config: dict) -> int:
    """Transformer blocks of a UNet2DConditionModel, counted from its config alone."""
    per_block, layers = config["transformer_layers_per_block"], config["layers_per_block"]
    down = sum(layers * t for t, kind in zip(per_block, config["down_block_types"], strict=True) if "CrossAttn" in kind)
    up = sum((layers + 1) * t for t, kind in zip(reversed(per_block), config["up_block_types"], strict=True)
             if "CrossAttn" in kind)
    return down + per_block[-1] + up  # the mid block is as deep as the deepest down block


def test_full_size_sdxl_gives_every_default_target_a_unique_kohya_name(sdxl_unet):
    modules = _targeted(sdxl_unet)
    names = kohya_names(sdxl_unet.config, modules)
    blocks = _transformer_blocks(sdxl_unet.config)
    print(f"SDXL base U-Net: {blocks} transformer blocks, {len(names)} attention projections with kohya names")
    assert blocks == 70 and len(modules) == blocks * 2 * 4  # attn1 and attn2, each to_q, to_k, to_v, to_out.0
    assert len(set(names.values())) == len(modules)
    for known in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_v",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v",
    ):
        assert known in names.values()
    assert names["up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v"] == (
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v")


def test_the_walk_over_the_blocks_gives_the_closed_form_sgm_indices(sdxl_unet, tiny_config):
    """DESIGN.md's formula, n = layers_per_block + 1: down i, j -> input_blocks n*i+j+1; up i, j -> output n*i+j."""
    for config in (sdxl_unet.config, tiny_config):
        n = config["layers_per_block"] + 1
        expected = {"mid_block.attentions.0": "middle_block.1"}
        for i, kind in enumerate(config["down_block_types"]):
            if kind == "CrossAttnDownBlock2D":
                expected |= {f"down_blocks.{i}.attentions.{j}": f"input_blocks.{n * i + j + 1}.1" for j in range(n - 1)}
        for i, kind in enumerate(config["up_block_types"]):
            if kind == "CrossAttnUpBlock2D":
                expected |= {f"up_blocks.{i}.attentions.{j}": f"output_blocks.{n * i + j}.1" for j in range(n)}
        assert sgm_prefixes(config) == expected


def test_diffusers_decodes_every_sdxl_kohya_name_back_to_its_module(sdxl_unet):
    """diffusers' own kohya reader (what load_lora_weights runs) maps opdiff's names back to the same modules."""
    modules = _targeted(sdxl_unet)
    state = {}
    for name in kohya_names(sdxl_unet.config, modules).values():
        state |= {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1),
                  f"{name}.alpha": torch.tensor(1.0)}
    decoded, alphas = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=sdxl_unet.config)
    assert len(decoded) == 2 * len(modules) and len(alphas) == len(modules)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in decoded.items()})
    assert {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")} == set(modules)


@torch.no_grad()
def test_a_kohya_file_from_another_writer_puts_the_expected_weights_into_the_unet(bundled_model, tmp_path):
    # Written the way sd-scripts saves a LoRA: SGM names spelled out, safetensors directly, alpha a scalar tensor.
    layers = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0":
            "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0",
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_k":
            "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
    }
    rank, alpha = 2, 3.0  # scale alpha / r = 1.5
    pipe = StableDiffusionXLPipeline.from_pretrained(bundled_model, dtype=torch.float32)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    modules = dict(pipe.unet.named_modules())
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for kohya, module in layers.items():
        d_out, d_in = modules[module].weight.shape
        tensors[f"{kohya}.lora_down.weight"] = torch.randn(rank, d_in, generator=generator)  # (r, d_in)
        tensors[f"{kohya}.lora_up.weight"] = torch.randn(d_out, rank, generator=generator)  # (d_out, r)
        tensors[f"{kohya}.alpha"] = torch.tensor(alpha)
    file = tmp_path / "foreign.safetensors"
    save_file(tensors, file, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                       "ss_network_alpha": str(alpha), "ss_base_model_version": "sdxl_base_v1-0"})

    pipe.load_lora_weights(str(file))
    pipe.fuse_lora()  # W0 + alpha / r * up @ down in the base weights
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    for kohya, module in layers.items():
        delta = after[f"{module}.weight"] - before[f"{module}.weight"]  # (d_out, d_in)
        expected = alpha / rank * tensors[f"{kohya}.lora_up.weight"] @ tensors[f"{kohya}.lora_down.weight"]
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{m}.weight" for m in layers.values()}
    # opdiff writes these very names for these modules.
    assert kohya_names(pipe.unet.config, layers.values()) == {m: k for k, m in layers.items()}


def test_modules_outside_the_attention_blocks_have_no_kohya_name(tiny_config):
    with pytest.raises(ValueError, match=r"cannot name U-Net module 'down_blocks\.0\.resnets\.0\.time_emb_proj'"):
        kohya_names(tiny_config, ["down_blocks.1.attentions.0.proj_in", "down_blocks.0.resnets.0.time_emb_proj"])
    with pytest.raises(ValueError, match="would share the kohya name 'lora_unet_input_blocks_4_1_proj_in'"):
        kohya_names(tiny_config, ["down_blocks.1.attentions.0.proj_in", "down_blocks.1.attentions.0.proj.in"])


@pytest.mark.parametrize(("key", "index", "kind"), [("down_block_types", 1, "SimpleCrossAttnDownBlock2D"),
                                                    ("up_block_types", 0, "KCrossAttnUpBlock2D"),
                                                    ("mid_block_type", None, "UNetMidBlock2DSimpleCrossAttn")])
def test_block_types_without_an_sgm_layout_are_refused(key, index, kind, tiny_config):
    config = json.loads(json.dumps(tiny_config))
    if index is None:
        config[key] = kind
    else:
        config[key][index] = kind
    with pytest.raises(ValueError, match=rf"cannot name \w+ block type '{kind}' in the kohya format"):
        sgm_prefixes(config)


def test_uncollapsed_adapters_are_refused(bundled_model):
    unet = UNet2DConditionModel.from_pretrained(bundled_model / "unet")
    opdiff.inject(unet, opdiff.AdapterConfig(method="op-lora"))
    first = re.escape(opdiff.adapted_layers(unet)[0].name)
    for writer in (lora_tensors, kohya_tensors):
        with pytest.raises(ValueError, match=rf"not collapsed \({first}\.lora_A\.default\.weight is still computed"):
            writer(unet)


def test_targets_outside_the_attention_blocks_export_the_diffusers_format_only(bundled_model, tmp_path, caplog):
    unet = UNet2DConditionModel.from_pretrained(bundled_model / "unet")
    opdiff.inject(unet, opdiff.AdapterConfig(target_modules=("to_q", "time_emb_proj")))
    with pytest.raises(ValueError, match=r"cannot name U-Net module 'down_blocks\.0\.resnets\.0\.time_emb_proj'"):
        export(unet, tmp_path / "lora.safetensors", format="kohya")
    assert not list(tmp_path.iterdir())
    assert export(unet, tmp_path / "lora.safetensors") == {"diffusers": tmp_path / "lora.safetensors"}
    assert "writing the diffusers format only: cannot name U-Net module" in caplog.text


@pytest.fixture(scope="module")
def run(tmp_path_factory, bundled_data) -> Path:
    """A finished 2-step LoRA run (alpha != rank) on one image."""
    root = tmp_path_factory.mktemp("kohya-run")
    (root / "data").mkdir()
    image = sorted(bundled_data.glob("*.png"))[0]
    for file in (image, image.with_suffix(".txt")):
        shutil.copy(file, root / "data" / file.name)
    return train(TrainConfig(data=root / "data", output_dir=root / "run", rank=4, alpha=2.0, max_steps=2, lr=1e-2))


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    """A copy of `run` that a test may export into."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def _content(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and header (its bytes are not reproducible: the header's key order varies)."""
    with safe_open(str(file), framework="pt") as f:
        return load_file(file), f.metadata()


def _dtypes(file: Path) -> set[torch.dtype]:
    return {v.dtype for k, v in load_file(file).items() if not k.endswith(".alpha")}


def test_cli_export_formats_and_file_names(run_copy, tmp_path, capsys):
    trained = {name: _content(run_copy / name) for name in (LORA_FILE, KOHYA_FILE)}
    assert main(["export", str(run_copy)]) == 0  # both formats, float32, the run folder's own names
    assert capsys.readouterr().out.splitlines() == [
        f"LoRA (diffusers): {run_copy / LORA_FILE}", "    for diffusers: pipe.load_lora_weights(file); exact",
        f"LoRA (kohya): {run_copy / KOHYA_FILE}",
        "    for ComfyUI, AUTOMATIC1111, Forge, sd-scripts, diffusers (kohya keys); exact"]
    for name, (tensors, meta) in trained.items():  # rebuilt from the run folder: what training wrote
        again, again_meta = _content(run_copy / name)
        assert again_meta == meta and again.keys() == tensors.keys(), name
        assert all(torch.equal(again[k], tensors[k]) for k in tensors), name

    assert main(["export", str(run_copy), "--format", "kohya", "--dtype", "bf16"]) == 0
    kohya_file = run_copy / "lora-bf16_kohya.safetensors"
    assert not (run_copy / "lora-bf16.safetensors").exists()
    assert all(k.startswith("lora_unet_") for k in load_file(kohya_file)) and _dtypes(kohya_file) == {torch.bfloat16}

    out = tmp_path / "mine.safetensors"
    assert main(["export", str(run_copy), "--format", "diffusers", "--dtype", "float16", "--out", str(out)]) == 0
    assert all(k.startswith("unet.") for k in load_file(out)) and _dtypes(out) == {torch.float16}
    assert not (tmp_path / "mine_kohya.safetensors").exists()

    assert main(["export", str(run_copy), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert load_file(tmp_path / "k.safetensors").keys() == load_file(run_copy / KOHYA_FILE).keys()


def test_python_export_names_both_files_and_rejects_unknown_formats(run_copy, tmp_path):
    assert export(run_copy, tmp_path / "x.safetensors") == {"diffusers": tmp_path / "x.safetensors",
                                                            "kohya": tmp_path / "x_kohya.safetensors"}
    with pytest.raises(ValueError, match="unknown export format 'gif'; choose one of: diffusers, kohya, both, "
                                         "lycoris, comfyui, a1111"):
        export(run_copy, format="gif")
    with pytest.raises(ValueError, match="--format a1111 is for DoRA methods .* this run trained lora"):
        export(run_copy, format="a1111")
    assert main(["export", str(run_copy), "--format", "lycoris"]) == 2


def test_measured_cmmd_goes_into_both_headers(run_copy):
    score = {"cmmd": 1.25, "n_images": 1, "clip_model": "ViT-L-14-336-quickgelu", "trustworthy": True}
    RunDir(run_copy).write_cmmd(score)  # what `opdiff eval` writes
    for fmt, file in export(run_copy).items():
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata()
        assert json.loads(meta["opdiff_cmmd"]) == score, fmt
        assert meta["opdiff_steps"] == "2" and meta["opdiff_alpha"] == "2.0"
