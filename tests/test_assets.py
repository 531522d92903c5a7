"""The bundled demo assets: the tiny SDXL-architecture model and the demo image set."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL = ASSETS / "tiny-sdxl"
DATA = ASSETS / "demo-data"

PROMPTS = [
    "",
    "a painting of a red circle on a blue background, opdiff style",
    "Portrait of an OLD sailor, 35mm photo; it's raining (dramatic lighting)",
    "naruto uzumaki eating ramen -- 8k, trending on artstation",
    " ".join(["a prompt long enough to be cut at seventy-seven tokens"] * 9),
]


def _load_script(name: str) -> ModuleType:
    # assets/ holds scripts, not a package; load them by path.
    spec = importlib.util.spec_from_file_location(f"assets_{name}", ASSETS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build_tiny_sdxl = _load_script("build_tiny_sdxl")
make_demo_data = _load_script("make_demo_data")
pretrain_tiny_sdxl = _load_script("pretrain_tiny_sdxl")
pretrain_tiny_clip = _load_script("pretrain_tiny_clip")


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(MODEL, dtype=torch.float32, local_files_only=True)


@pytest.fixture(scope="module")
def open_clip_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


# ---------------------------------------------------------------------------------------------
# tiny-sdxl: loading and running


@pytest.mark.parametrize(
    "name, cls",
    [
        ("text_encoder", CLIPTextModel),
        ("text_encoder_2", CLIPTextModelWithProjection),
        ("vae", AutoencoderKL),
        ("unet", UNet2DConditionModel),
    ],
)
def test_model_loads_offline_in_float32(pipe, name, cls):
    module = getattr(pipe, name)
    assert type(module) is cls
    assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_weights_are_stored_in_float16_behind_float32_configs():
    files = sorted(MODEL.glob("*/*.safetensors"))
    assert {f.parent.name for f in files} == {"text_encoder", "text_encoder_2", "vae", "unet"}
    for f in files:
        assert {t.dtype for t in load_file(f).values() if t.is_floating_point()} == {torch.float16}, f
    # transformers' default dtype="auto" reads this, so a plain from_pretrained gives float32.
    for name in ("text_encoder", "text_encoder_2"):
        assert json.loads((MODEL / name / "config.json").read_text())["dtype"] == "float32"


def test_pipeline_generates_a_64px_image_deterministically(pipe):
    def generate() -> np.ndarray:
        return pipe(
            "a painting of a red circle, opdiff style",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    image = generate()  # (1, 64, 64, 3)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    np.testing.assert_array_equal(image, generate())


def test_prompt_embeddings_have_sdxl_layout(pipe):
    embeds, _, pooled, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert embeds.shape == (1, 77, hidden)  # both encoders' penultimate states, concatenated
    assert pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)


def test_vae_downsamples_by_8_into_4_channels(pipe):
    cfg = pipe.vae.config
    assert (cfg.latent_channels, cfg.scaling_factor, cfg.force_upcast) == (4, 0.13025, True)
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean  # (1, 4, 8, 8)
    assert latents.shape == (1, 4, 8, 8)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_scheduler_is_sdxl_euler(pipe):
    assert type(pipe.scheduler) is EulerDiscreteScheduler
    cfg = pipe.scheduler.config
    sdxl = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }
    assert {k: cfg[k] for k in sdxl} == sdxl


# ---------------------------------------------------------------------------------------------
# tiny-sdxl: U-Net structure that adapters and the kohya export rely on


def test_unet_conditioning_dims_are_consistent(pipe):
    unet, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert te1.hidden_size != te2.hidden_size  # as in SDXL, so swapping the encoders cannot pass
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert te1.vocab_size == te2.vocab_size == 49408
    assert te1.max_position_embeddings == te2.max_position_embeddings == 77


def test_unet_has_sdxl_block_layout(pipe):
    cfg = pipe.unet.config
    assert list(cfg.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(cfg.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert cfg.layers_per_block == 2  # kohya's SGM numbering: n = layers_per_block + 1 = 3
    assert cfg.use_linear_projection
    attention_blocks = {
        name.rsplit(".transformer_blocks", 1)[0]
        for name, _ in pipe.unet.named_modules()
        if ".transformer_blocks." in name
    }
    assert attention_blocks == {
        *(f"down_blocks.{i}.attentions.{j}" for i in (1, 2) for j in range(2)),
        "mid_block.attentions.0",
        *(f"up_blocks.{i}.attentions.{j}" for i in (0, 1) for j in range(3)),
    }


def test_attention_projections_are_linear(pipe):
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    found = {
        name: module
        for name, module in pipe.unet.named_modules()
        if name.endswith(targets) and ".attn" in name
    }
    # attn1 (self) and attn2 (cross) in every transformer block, four projections each.
    n_blocks = sum(1 for name, _ in pipe.unet.named_modules() if name.endswith(".attn2"))
    assert n_blocks > 0 and len(found) == 2 * 4 * n_blocks
    assert all(type(m) is torch.nn.Linear for m in found.values())
    to_k = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    assert to_k.in_features == pipe.unet.config.cross_attention_dim


# ---------------------------------------------------------------------------------------------
# tiny-sdxl: tokenizers


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_tokenizer_matches_open_clip(pipe, open_clip_tokenizer, name, prompt):
    tokenizer = getattr(pipe, name)
    got = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    expected = open_clip_tokenizer(prompt)[0].tolist()  # (77,), padded with 0
    end = expected.index(open_clip_tokenizer.eot_token_id) + 1
    assert got[:end] == expected[:end]
    assert got[end:] == [tokenizer.pad_token_id] * (77 - end)


def test_tokenizers_pad_as_sdxl(pipe):
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
    assert (pipe.tokenizer.pad_token, pipe.tokenizer.pad_token_id) == ("<|endoftext|>", 49407)
    assert (pipe.tokenizer_2.pad_token, pipe.tokenizer_2.pad_token_id) == ("!", 0)


def test_tokenizer_2_reads_exclamation_marks_as_padding_like_sdxl(pipe, open_clip_tokenizer):
    # The pad token "!" is special, so SDXL's tokenizer_2 (and ours) splits each "!" off as
    # id 0, where open_clip reads "!</w>" = 256, "!!</w>" = 748, "!!!</w>" = 995.
    ids = pipe.tokenizer_2("! !! !!!").input_ids
    assert ids == [49406, 0, 0, 0, 0, 0, 0, 49407]
    assert pipe.tokenizer("! !! !!!").input_ids == [49406, 256, 748, 995, 49407]
    assert open_clip_tokenizer("! !! !!!")[0, :5].tolist() == [49406, 256, 748, 995, 49407]


def test_tokenizer_folders_share_their_vocabulary_files():
    for file in ("vocab.json", "merges.txt"):
        assert (MODEL / "tokenizer" / file).read_bytes() == (MODEL / "tokenizer_2" / file).read_bytes()


# ---------------------------------------------------------------------------------------------
# tiny-sdxl: reproducible build


def _config_without_versions(path: Path) -> dict:
    # Configs record the diffusers/transformers versions that wrote them; those may move on.
    return {k: v for k, v in json.loads(path.read_text()).items() if "version" not in k}


def test_model_rebuild_matches_committed_layout(tmp_path):
    # The build script writes the random init; the committed weights are pretrained from it
    # (pretrain_tiny_sdxl.py), so a rebuild must match everything but the weight values.
    build_tiny_sdxl.build(tmp_path)
    committed = sorted(p.relative_to(MODEL) for p in MODEL.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == committed
    for rel in committed:
        ours, theirs = MODEL / rel, tmp_path / rel
        if rel.suffix == ".safetensors":
            a, b = load_file(ours), load_file(theirs)
            assert a.keys() == b.keys(), rel
            assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a), rel
        elif rel.parent.name.startswith("tokenizer"):
            assert ours.read_bytes() == theirs.read_bytes(), rel
        else:
            assert _config_without_versions(ours) == _config_without_versions(theirs), rel


def test_model_rebuild_is_deterministic(tmp_path):
    a, b = build_tiny_sdxl.build(tmp_path / "a"), build_tiny_sdxl.build(tmp_path / "b")
    for path in sorted(a.glob("*/*.safetensors")):
        x, y = load_file(path), load_file(b / path.relative_to(a))
        assert all(torch.equal(x[k], y[k]) for k in x), path


def test_committed_weights_are_pretrained_not_the_random_init(tmp_path):
    build_tiny_sdxl.build(tmp_path)
    for name in ("vae", "unet", "text_encoder", "text_encoder_2"):
        (file,) = (MODEL / name).glob("*.safetensors")
        ours, init = load_file(file), load_file(tmp_path / name / file.name)
        assert any(not torch.equal(ours[k], init[k]) for k in ours), name


# Tiny pretraining runs: every stage, a few steps each, on a 32-image world.
QUICK = {"world_size": 32, "looks_size": 16, "vae_steps": 2, "vae_batch": 4, "unet_steps": 2, "unet_batch": 4,
         "warmup": 2, "checkpoint_every": 1}


def _trained_state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name in pretrain_tiny_sdxl.TRAINED for k, v in getattr(pipe, name).state_dict().items()}


def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path, single_thread):
    settings = pretrain_tiny_sdxl.Settings(**QUICK)
    first = _trained_state(pretrain_tiny_sdxl.pretrain(settings, tmp_path / "first"))
    again = _trained_state(pretrain_tiny_sdxl.pretrain(settings, tmp_path / "again"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    # Stopped within the VAE stage, then within the U-Net stage, then run to the end in the same folder.
    for vae_steps, unet_steps in ((1, 0), (2, 1)):
        stopped = pretrain_tiny_sdxl.Settings(**{**QUICK, "vae_steps": vae_steps, "unet_steps": unet_steps})
        pretrain_tiny_sdxl.pretrain(stopped, tmp_path / "resumed")
    resumed = _trained_state(pretrain_tiny_sdxl.pretrain(settings, tmp_path / "resumed"))
    assert all(torch.equal(first[k], resumed[k]) for k in first)
    init = StableDiffusionXLPipeline.from_pretrained(tmp_path / "first" / "random-init", local_files_only=True)
    assert all(not torch.equal(first[k], v) for k, v in _trained_state(init).items() if k.endswith("conv_out.weight"))


def test_pretraining_refuses_a_checkpoint_of_other_settings(tmp_path, single_thread):
    pretrain_tiny_sdxl.pretrain(pretrain_tiny_sdxl.Settings(**QUICK), tmp_path)
    with pytest.raises(ValueError, match="written with other settings"):
        pretrain_tiny_sdxl.pretrain(pretrain_tiny_sdxl.Settings(**{**QUICK, "vae_lr": 1.0}), tmp_path)


def test_pretrained_vae_latents_are_normalized(pipe):
    images, _ = pretrain_tiny_sdxl.procedural.world(64, seed=1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    latents = pretrain_tiny_sdxl.latent_means(pipe.vae, pixels) * pipe.vae.config.scaling_factor  # (64, 4, 8, 8)
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 0.3
    assert ((latents.std(dim=(0, 2, 3)) - 1).abs() < 0.3).all()


def test_clip_pretraining_is_deterministic(tmp_path, single_thread):
    settings = pretrain_tiny_clip.Settings(world_size=32, looks_size=16, steps=2, batch=8, warmup=1)
    a = pretrain_tiny_clip.pretrain(settings, tmp_path / "a").state_dict()
    b = pretrain_tiny_clip.pretrain(settings, tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# demo-data


def _demo_images() -> list[Path]:
    return sorted(DATA.glob("*.png"))


def test_demo_data_has_captioned_images():
    images = _demo_images()
    assert 16 <= len(images) <= 32
    captions = []
    for path in images:
        with Image.open(path) as im:
            assert (im.size, im.mode) == ((128, 128), "RGB"), path
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption.startswith("a painting of ") and caption.endswith(", opdiff style"), path
        captions.append(caption)
    assert len(set(captions)) == len(captions)
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 1_000_000


def test_demo_data_covers_every_object():
    captions = " ".join(p.read_text(encoding="utf-8") for p in DATA.glob("*.txt"))
    assert all(f" {obj} " in captions for obj in make_demo_data.OBJECTS)


def test_demo_data_rebuild_is_byte_identical(tmp_path):
    make_demo_data.make(tmp_path, count=len(_demo_images()))
    committed = sorted(p.name for p in DATA.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


@pytest.mark.parametrize("count", [0, 10**6])
def test_demo_data_rejects_impossible_counts(count):
    with pytest.raises(ValueError, match="count must be in 1.."):
        make_demo_data.scenes(count)
