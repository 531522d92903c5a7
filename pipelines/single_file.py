"""SDXL bases shared as one `.safetensors` file, loaded offline.

Supported: the original (SGM) layout that Stability's `sd_xl_base_1.0.safetensors` and the SDXL fine-tunes built
on it use, with all four parts in the file:

    model.diffusion_model.*               U-Net, 4 input channels (input_blocks / middle_block / output_blocks)
    conditioner.embedders.0.transformer.*  CLIP ViT-L text encoder
    conditioner.embedders.1.model.*        OpenCLIP ViT-bigG text encoder
    first_stage_model.*                    VAE

diffusers' `from_single_file` converts such a file but needs the architecture's diffusers configs and tokenizer
files, which it downloads unless given a folder. opdiff ships them (`assets/sdxl-base-1.0`: SDXL base 1.0's
model_index, scheduler, text encoder, VAE and U-Net configs and both tokenizers), and the bundled tiny model's
folder serves for files of its architecture. A file is matched to an architecture by the shapes that fix one
(channel widths, embedding sizes, layer counts); a fine-tune of SDXL base has SDXL base's shapes.

Refused with a reason: other layouts (SD 1.x, SD 2.x, the SDXL refiner, inpainting checkpoints with 9 input
channels, v-prediction SDXL, FLUX, SD3, a LoRA or a U-Net-only file) and `.ckpt` pickles.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Architectures a single file may have: name -> diffusers folder whose configs and tokenizers describe it.
ARCHITECTURES = {
    "SDXL base 1.0": ASSETS / "sdxl-base-1.0",
    "opdiff's tiny SDXL (assets/tiny-sdxl)": ASSETS / "tiny-sdxl",
}
UNET, CLIP_L, CLIP_G, VAE = ("model.diffusion_model.", "conditioner.embedders.0.transformer.",
                             "conditioner.embedders.1.model.", "first_stage_model.")
PARTS = {UNET: "the U-Net", CLIP_L: "the CLIP ViT-L text encoder", CLIP_G: "the OpenCLIP ViT-bigG text encoder",
         VAE: "the VAE"}
SUPPORTED = ("an SDXL base checkpoint in the original (SGM) layout with U-Net, both text encoders and VAE "
             "(sd_xl_base_1.0.safetensors or a fine-tune of it)")
# Key patterns that identify what a file is, checked before the SGM SDXL layout (first match wins).
OTHER_LAYOUTS = (
    (re.compile(r"(^|\.)lora_(unet|te\d?)_|\.lora_(down|up|A|B)\."), "a LoRA, not a base model"),
    (re.compile(r"(^|\.)double_blocks\.\d+\."), "a FLUX checkpoint"),
    (re.compile(r"(^|\.)joint_blocks\.\d+\."), "a Stable Diffusion 3 checkpoint"),
    (re.compile(r"^cond_stage_model\.transformer\."), "a Stable Diffusion 1.x checkpoint"),
    (re.compile(r"^cond_stage_model\.model\."), "a Stable Diffusion 2.x checkpoint"),
    (re.compile(r"^conditioner\.embedders\.0\.model\."), "an SDXL refiner checkpoint (OpenCLIP alone conditions it)"),
    (re.compile(r"^v_pred$"), "a v-prediction SDXL checkpoint (opdiff trains SDXL's epsilon prediction)"),
    (re.compile(r"^(down_blocks|mid_block|up_blocks)\.\d"), "a U-Net alone in diffusers' layout"),
)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Return {key: shape} of a safetensors file without reading its tensors. Raises ValueError naming the file
    when it is not a readable `.safetensors` file."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: only .safetensors single files are read (a .ckpt or .pt file is a pickle "
                         "that can run code when loaded); convert it to .safetensors first")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"{path.name} is not a readable .safetensors file: {e}") from e


def architecture(path: Path) -> tuple[str, Path]:
    """Return (name, config folder) of the supported architecture a single-file checkpoint has.

    Raises ValueError naming the file and what it is instead (see `detect`).
    """
    return detect(read_shapes(path), path.name)


def detect(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[str, Path]:
    """Return (architecture name, config folder) for a checkpoint's {key: shape}; `name` names it in errors.

    Raises ValueError saying what the checkpoint is instead: another model family, an inpainting, refiner or
    v-prediction checkpoint, a part missing, or SDXL's layout with the shapes of no supported architecture (the
    first that differ from the closest one).
    """
    for pattern, what in OTHER_LAYOUTS:
        if any(pattern.search(k) for k in shapes):
            raise ValueError(f"{name} is {what}; opdiff's single-file bases are {SUPPORTED}")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        kind = ("an inpainting checkpoint (9 input channels: latents, mask, masked image)" if conv_in[1] == 9
                else f"a U-Net with {conv_in[1]} input channels")
        raise ValueError(f"{name} is {kind}; opdiff trains text-to-image SDXL (4 input channels): use "
                         "the base model the inpainting one was made from")
    missing = [what for prefix, what in PARTS.items() if not any(k.startswith(prefix) for k in shapes)]
    if missing:
        found = "; ".join(sorted({k.split(".")[0] for k in shapes})[:4]) or "no tensors"
        raise ValueError(f"{name} lacks {', '.join(missing)} (no {' / '.join(p + '*' for p, w in PARTS.items() if w in missing)} "
                         f"keys; top-level names: {found}); opdiff's single-file bases are {SUPPORTED}")
    mismatches = {}
    for arch, folder in ARCHITECTURES.items():
        wrong = [f"{k} {want} (the file has {shapes.get(k, 'none')})"
                 for k, want in signature(folder).items() if shapes.get(k) != want]
        if not wrong:
            return arch, folder
        mismatches[arch] = wrong
    closest = min(mismatches, key=lambda n: len(mismatches[n]))
    raise ValueError(f"{name} has the SDXL layout but not the shapes of a supported architecture: "
                     f"{closest} has {'; '.join(mismatches[closest][:3])}")


def signature(folder: Path) -> dict[str, tuple[int, ...]]:
    """Return {SGM key: shape} of tensors whose shapes pin down an architecture, from its diffusers configs:
    channel widths, embedding sizes, and (as the shape of the last layer's weight) the layer counts."""
    unet, te1, te2, vae = (json.loads((folder / sub / name).read_text(encoding="utf-8")) for sub, name in
                           (("unet", "config.json"), ("text_encoder", "config.json"),
                            ("text_encoder_2", "config.json"), ("vae", "config.json")))
    c0, time = unet["block_out_channels"][0], 4 * unet["block_out_channels"][0]
    deepest = _last_transformer_block(unet)
    return {
        UNET + "input_blocks.0.0.weight": (c0, unet["in_channels"], 3, 3),
        UNET + "time_embed.0.weight": (time, c0),
        UNET + "label_emb.0.0.weight": (time, unet["projection_class_embeddings_input_dim"]),
        UNET + "out.2.weight": (unet["out_channels"], c0, 3, 3),
        UNET + f"middle_block.1.transformer_blocks.{deepest}.attn2.to_k.weight":
            (unet["block_out_channels"][-1], unet["cross_attention_dim"]),
        CLIP_L + "text_model.embeddings.token_embedding.weight": (te1["vocab_size"], te1["hidden_size"]),
        CLIP_L + f"text_model.encoder.layers.{te1['num_hidden_layers'] - 1}.mlp.fc1.weight":
            (te1["intermediate_size"], te1["hidden_size"]),
        CLIP_G + "token_embedding.weight": (te2["vocab_size"], te2["hidden_size"]),
        CLIP_G + "text_projection": (te2["hidden_size"], te2["projection_dim"]),
        CLIP_G + f"transformer.resblocks.{te2['num_hidden_layers'] - 1}.mlp.c_fc.weight":
            (te2["intermediate_size"], te2["hidden_size"]),
        VAE + "encoder.conv_in.weight": (vae["block_out_channels"][0], vae["in_channels"], 3, 3),
        VAE + "decoder.conv_in.weight": (vae["block_out_channels"][-1], vae["latent_channels"], 3, 3),
        VAE + "quant_conv.weight": (2 * vae["latent_channels"], 2 * vae["latent_channels"], 1, 1),
    }


def _last_transformer_block(unet: dict) -> int:
    """Index of the mid block's last transformer block (as deep as the deepest down block)."""
    per_block = unet["transformer_layers_per_block"]
    depth = per_block[-1] if isinstance(per_block, list) else per_block
    return depth - 1


def load(path: str | Path, dtype: torch.dtype = torch.float32, **components):
    """Return the `StableDiffusionXLPipeline` in a single-file checkpoint, in `dtype`, loaded offline.

    The file's architecture (`architecture`) supplies the configs and tokenizers; `components` (e.g. `vae=`) replace
    the file's own. Raises ValueError for an unsupported file (see `architecture`).
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    _, folder = architecture(path)
    return StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                      dtype=dtype, **components)
