"""Write a diffusers SDXL pipeline as one checkpoint in Stability's original (SGM) key layout, as
`sd_xl_base_1.0.safetensors` and the SDXL fine-tunes shared as single files are laid out:

    model.diffusion_model.*               the U-Net (input_blocks / middle_block / output_blocks)
    conditioner.embedders.0.transformer.*  CLIP ViT-L (a transformers CLIPTextModel state dict)
    conditioner.embedders.1.model.*        OpenCLIP ViT-bigG (open_clip names, q/k/v fused into in_proj)
    first_stage_model.*                    the VAE (LDM names, attention projections as 1x1 convolutions)

Written from the layouts themselves (generative-models' `sgm/modules/diffusionmodules/openaimodel.py`,
`sgm/modules/encoders/modules.py`, open_clip's `transformer.py`), independently of opdiff's code, so a test can load
the file with diffusers' own converter and compare the weights with the bundled model's.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def sgm_state_dict(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """Return the pipeline's U-Net, both text encoders and VAE as one SGM-layout state dict."""
    out = {}
    out |= {f"model.diffusion_model.{k}": v for k, v in unet_to_sgm(pipe.unet).items()}
    te1 = pipe.text_encoder.state_dict()
    out |= {f"conditioner.embedders.0.transformer.{_with_text_model(k)}": v for k, v in te1.items()}
    out |= {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_from(pipe.text_encoder_2).items()}
    out |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(pipe.vae).items()}
    return {k: v.detach().contiguous() for k, v in out.items()}


def sgm_shapes(pipe: StableDiffusionXLPipeline) -> dict[str, tuple[int, ...]]:
    """Return {SGM key: shape} of a pipeline (which may live on the meta device)."""
    return {k: tuple(v.shape) for k, v in sgm_state_dict(pipe).items()}


def _with_text_model(key: str) -> str:
    """CLIP-L keys as SGM stores them: `text_model.` in front (newer transformers flatten CLIPTextModel)."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def unet_to_sgm(unet) -> dict[str, torch.Tensor]:
    """U-Net keys in openaimodel.py's flat block lists: input_blocks.0 = conv_in; per down block one entry per layer
    (.0 resnet, .1 attention) and one for the downsampler (`.0.op`); middle_block = resnet, attention, resnet; per
    up block layers_per_block + 1 entries, the upsampler inside the last (`.1.conv`, or `.2.conv` after an attention)."""
    config = unet.config
    n = config.layers_per_block + 1
    sd = unet.state_dict()
    out = {}
    renames = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for key, value in sd.items():
        parts = key.split(".")
        module = ".".join(parts[:-1])
        if module in renames:
            out[f"{renames[module]}.{parts[-1]}"] = value
            continue
        if parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets":
                out[f"input_blocks.{n * i + j + 1}.0.{_resnet(rest)}"] = value
            elif kind == "attentions":
                out[f"input_blocks.{n * i + j + 1}.1.{'.'.join(rest)}"] = value
            else:  # downsamplers.0.conv.weight
                out[f"input_blocks.{n * i + n}.0.op.{rest[-1]}"] = value
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            index = 1 if kind == "attentions" else 2 * j
            out[f"middle_block.{index}.{_resnet(rest) if kind == 'resnets' else '.'.join(rest)}"] = value
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            has_attention = hasattr(unet.up_blocks[i], "attentions") and unet.up_blocks[i].attentions is not None
            if kind == "resnets":
                out[f"output_blocks.{n * i + j}.0.{_resnet(rest)}"] = value
            elif kind == "attentions":
                out[f"output_blocks.{n * i + j}.1.{'.'.join(rest)}"] = value
            else:  # upsamplers.0.conv.weight, in the block's last entry
                out[f"output_blocks.{n * i + n - 1}.{2 if has_attention else 1}.conv.{rest[-1]}"] = value
        else:
            raise KeyError(f"no SGM name for U-Net key {key}")
    return out


def _resnet(rest: list[str]) -> str:
    return f"{RESNET[rest[0]]}.{'.'.join(rest[1:])}"


def open_clip_from(text_encoder_2) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection as open_clip's text tower: resblocks with in_proj = [q; k; v], the projection
    stored as x @ text_projection (the transpose of the Linear's weight)."""
    sd = text_encoder_2.state_dict()
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
    }
    for layer in range(text_encoder_2.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}", f"transformer.resblocks.{layer}"
        for kind in ("weight", "bias"):
            out[f"{dst}.attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}.self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            out[f"{dst}.attn.out_proj.{kind}"] = sd[f"{src}.self_attn.out_proj.{kind}"]
            out[f"{dst}.ln_1.{kind}"] = sd[f"{src}.layer_norm1.{kind}"]
            out[f"{dst}.ln_2.{kind}"] = sd[f"{src}.layer_norm2.{kind}"]
            out[f"{dst}.mlp.c_fc.{kind}"] = sd[f"{src}.mlp.fc1.{kind}"]
            out[f"{dst}.mlp.c_proj.{kind}"] = sd[f"{src}.mlp.fc2.{kind}"]
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys as LDM's `Encoder`/`Decoder`: down.{i}.block.{j}, up.{n-1-i} (decoder blocks in reverse),
    mid.block_1/attn_1/block_2, norm_out; attention q/k/v/proj_out as (C, C, 1, 1) convolutions."""
    sd = vae.state_dict()
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        rest = parts[1:]
        if rest[0] in ("conv_in", "conv_out"):
            name = ".".join(rest)
        elif rest[0] == "conv_norm_out":
            name = "norm_out." + rest[1]
        elif rest[0] in ("down_blocks", "up_blocks"):
            i = int(rest[1])
            block = f"down.{i}" if rest[0] == "down_blocks" else f"up.{n_up - 1 - i}"
            if rest[2] == "resnets":
                name = f"{block}.block.{rest[3]}.{VAE_RESNET.get(rest[4], rest[4])}.{rest[5]}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                name = f"{block}.{'downsample' if rest[0] == 'down_blocks' else 'upsample'}.conv.{rest[-1]}"
        elif rest[0] == "mid_block":
            if rest[1] == "resnets":
                name = f"mid.block_{int(rest[2]) + 1}.{VAE_RESNET.get(rest[3], rest[3])}.{rest[4]}"
            else:
                inner = ".".join(rest[3:-1])
                name = f"mid.attn_1.{VAE_ATTENTION[inner]}.{rest[-1]}"
                if rest[-1] == "weight" and value.dim() == 2:
                    value = value[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out[f"{side}.{name}"] = value
    return out
