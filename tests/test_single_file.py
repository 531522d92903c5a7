"""Single-file SDXL bases: a checkpoint in Stability's original (SGM) layout loads offline, trains, and holds
exactly the weights it was written from; the shipped SDXL configs describe SDXL base 1.0's shapes; files of other
model families are refused by name and reason."""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from sgm_checkpoint import sgm_shapes, sgm_state_dict, vae_to_ldm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.config import TrainConfig
from pipelines.model import load_pipeline
from pipelines.single_file import ARCHITECTURES, detect
from pipelines.train import train

pytestmark = pytest.mark.usefixtures("single_thread")

SDXL = ARCHITECTURES["SDXL base 1.0"]
# Shapes of stabilityai's sd_xl_base_1.0.safetensors, as published (independent of the shipped configs).
SDXL_BASE_SHAPES = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
}


@pytest.fixture(scope="module")
def bundled_pipe(bundled_model) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(bundled_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bundled_pipe) -> Path:
    """The bundled model written as one SGM-layout `.safetensors` file, float32."""
    path = tmp_path_factory.mktemp("single") / "tiny_sdxl_sgm.safetensors"
    save_file(sgm_state_dict(bundled_pipe), path)
    return path


def test_single_file_checkpoint_loads_offline_with_the_bundled_weights(checkpoint, bundled_pipe):
    pipe = load_pipeline(checkpoint, device="cpu")  # HF_HUB_OFFLINE=1 (conftest): nothing may be downloaded
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(bundled_pipe, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), f"{part}.{key}"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert dict(pipe.scheduler.config) == dict(bundled_pipe.scheduler.config)


def test_a_single_file_vae_beside_a_single_file_base_takes_the_base_architectures_config(checkpoint, bundled_pipe,
                                                                                           tmp_path):
    vae_file = tmp_path / "vae.safetensors"  # a VAE shared alone: LDM names without the first_stage_model. prefix
    save_file({k: v.contiguous() for k, v in vae_to_ldm(bundled_pipe.vae).items()}, vae_file)
    pipe = load_pipeline(checkpoint, device="cpu", vae=vae_file)
    theirs = bundled_pipe.vae.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in pipe.vae.state_dict().items())


def test_training_from_a_single_file_names_it_by_file_name_and_hash(checkpoint, bundled_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for image in sorted(bundled_data.glob("*.png"))[:1]:
        for file in (image, image.with_suffix(".txt")):
            (data / file.name).write_bytes(file.read_bytes())
    run_dir = train(TrainConfig(base=str(checkpoint), data=data, output_dir=tmp_path / "run", max_steps=1))
    with safe_open(str(run_dir / "lora_kohya.safetensors"), framework="pt") as f:
        meta = f.metadata()
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["opdiff_base"] == meta["ss_sd_model_name"] == checkpoint.name
    assert meta["opdiff_base_sha256"] == meta["ss_new_sd_model_hash"] == digest
    assert str(checkpoint.parent) not in json.dumps(meta)


def _meta_pipeline(folder: Path) -> types.SimpleNamespace:
    """The four networks of a diffusers config folder, built on the meta device (shapes, no weights)."""
    with torch.device("meta"):
        return types.SimpleNamespace(
            unet=UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text())),
            vae=AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text())),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        )


def test_shipped_configs_have_sdxl_base_shapes_and_match_it():
    shapes = sgm_shapes(_meta_pipeline(SDXL))
    for key, shape in SDXL_BASE_SHAPES.items():
        assert shapes[key] == shape, key
    assert sum(k.startswith("model.diffusion_model.") for k in shapes) == 1680  # the base U-Net's tensor count
    assert detect(shapes, "sd_xl_base_1.0.safetensors") == ("SDXL base 1.0", SDXL)


def test_shipped_tokenizers_are_sdxls():
    one, two = (CLIPTokenizer.from_pretrained(SDXL / sub) for sub in ("tokenizer", "tokenizer_2"))
    ids = one("a photo of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]  # CLIP's BPE ids
    assert two("a photo of an astronaut riding a horse").input_ids == ids
    assert (one.pad_token, two.pad_token, one.model_max_length) == ("<|endoftext|>", "!", 77)
    index = json.loads((SDXL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"][1] == "EulerDiscreteScheduler"


def _sdxl_with(**changes) -> dict[str, tuple[int, ...]]:
    shapes = sgm_shapes(_meta_pipeline(SDXL))
    return {**shapes, **changes}


@pytest.mark.parametrize(("shapes", "message"), [
    ({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "is a Stable Diffusion 1.x checkpoint"),
    ({"cond_stage_model.model.token_embedding.weight": (49408, 1024)}, "is a Stable Diffusion 2.x checkpoint"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "is a FLUX checkpoint"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "is a FLUX checkpoint"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "is a Stable Diffusion 3"),
    ({"conditioner.embedders.0.model.text_projection": (1280, 1280)}, "is an SDXL refiner checkpoint"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640)}, "is a LoRA, not a base model"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "is a U-Net alone in diffusers' layout"),
], ids=["sd15", "sd2", "flux", "flux-sgm", "sd3", "refiner", "lora", "diffusers-unet"])
def test_other_model_families_are_refused_with_what_they_are(shapes, message):
    with pytest.raises(ValueError, match=rf"^model\.safetensors {message}.*single-file bases are an SDXL base"):
        detect(shapes, "model.safetensors")


def test_inpainting_refiner_parts_and_other_shapes_are_refused():
    inpaint = _sdxl_with(**{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})
    with pytest.raises(ValueError, match=r"^inpaint\.safetensors is an inpainting checkpoint \(9 input channels"):
        detect(inpaint, "inpaint.safetensors")
    vpred = _sdxl_with(v_pred=(0,))
    with pytest.raises(ValueError, match="is a v-prediction SDXL checkpoint"):
        detect(vpred, "v.safetensors")
    no_vae = {k: v for k, v in _sdxl_with().items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ValueError, match=r"^unet_te\.safetensors lacks the VAE \(no first_stage_model\.\* keys"):
        detect(no_vae, "unet_te.safetensors")
    wider = _sdxl_with(**{"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3)})
    with pytest.raises(ValueError, match=r"has the SDXL layout but not the shapes of a supported architecture: "
                                         r"SDXL base 1\.0 has model\.diffusion_model\.input_blocks\.0\.0\.weight "
                                         r"\(320, 4, 3, 3\) \(the file has \(384, 4, 3, 3\)\)"):
        detect(wider, "wider.safetensors")


def test_a_refused_file_is_named_when_training_from_it(tmp_path, demo_subset):
    sd15 = tmp_path / "v1-5-pruned.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)}, sd15)
    with pytest.raises(ValueError, match="v1-5-pruned.safetensors is a Stable Diffusion 1.x checkpoint"):
        train(TrainConfig(base=str(sd15), data=demo_subset(1), output_dir=tmp_path / "run", max_steps=1))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match=r"model\.ckpt: only \.safetensors single files are read"):
        load_pipeline(pickle)
