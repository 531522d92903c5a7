"""The kohya (sd-scripts) LoRA format for SDXL U-Nets: the keys ComfyUI, AUTOMATIC1111/Forge and kohya read.

Each adapted layer, named by its module path in Stability's SGM U-Net with dots as underscores, is stored as

    lora_unet_<name>.lora_down.weight   A                 (r, d_in)
    lora_unet_<name>.lora_up.weight     B                 (d_out, r)
    lora_unet_<name>.alpha              alpha             ()          W = W0 + alpha / r * up @ down, as in PEFT
    lora_unet_<name>.dora_scale         DoRA magnitude m  (d_out, 1)  DoRA methods only

e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`.

The SGM U-Net numbers its blocks in one flat list per side. `input_blocks.0` is conv_in; each down block then adds
one entry per layer (`.0` the resnet, `.1` the attention) and one for its downsampler (the last block has none);
`middle_block` is resnet, attention, resnet; each up block adds layers_per_block + 1 entries, its upsampler inside
the last. With n = layers_per_block + 1 that is down_blocks.i.attentions.j -> input_blocks.{n*i+j+1}.1,
mid_block.attentions.0 -> middle_block.1, up_blocks.i.attentions.j -> output_blocks.{n*i+j}.1; the path inside an
attention block (`transformer_blocks.k.attn1.to_q`, `to_out.0`, ...) is the same in both U-Nets.

DoRA: PEFT scales each output row, W = m * (W0 + s B A) / ||W0 + s B A||_row with m of shape (d_out,). LyCORIS (the
DoRA that sd-scripts trains through `--network_module lycoris.kohya`) stores that magnitude as `dora_scale` of shape
(d_out, 1), its `wd_on_output` layout, and ComfyUI tells the layouts apart by `dora_scale.shape[0] == d_out`. The
older layout (1, d_in) normalizes input columns instead, a different decomposition that cannot hold PEFT's
magnitude. Loaders differ here, so a DoRA run ships one kohya-keyed file per loader family (`pipelines.dora_files`).

The header follows sd-scripts (`train_network.py`, `networks/lora.py` `save_weights`): its `ss_*` training keys,
then `sshs_model_hash` / `sshs_legacy_hash` computed from the tensors and those keys (`sshs_hashes`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from pipelines.provenance import model_identity

PREFIX = "lora_unet_"
# sd-scripts' name for the SDXL base architecture (library/sdxl_model_util.py) and the ModelSpec one (sai_model_spec.py).
SDXL_MODEL_VERSION = "sdxl_base_v1-0"
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

# Block types whose layout in the SGM U-Net is known: True if the block has attentions, False if it has only resnets.
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": True, None: False}


def sgm_prefixes(config: Mapping[str, Any]) -> dict[str, str]:
    """Return {diffusers attention block: SGM attention block} for a `UNet2DConditionModel` config.

    E.g. for SDXL `{"down_blocks.1.attentions.0": "input_blocks.4.1", ..., "mid_block.attentions.0": "middle_block.1",
    ..., "up_blocks.0.attentions.0": "output_blocks.0.1", ...}`, built by walking the blocks the way the SGM U-Net
    lays them out (block types, layers per block). Raises ValueError for a block type without an SGM layout.
    """
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    layers = config["layers_per_block"]
    per_block = [layers] * len(down_types) if isinstance(layers, int) else list(layers)  # (num down blocks,)
    prefixes = {}
    index = 1  # input_blocks.0 is conv_in
    for i, kind in enumerate(down_types):
        attention = _has_attention(kind, DOWN_BLOCKS, "down")
        for j in range(per_block[i]):
            if attention:
                prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        index += i < len(down_types) - 1  # the downsampler is an entry of its own
    if _has_attention(config.get("mid_block_type"), MID_BLOCKS, "mid"):
        prefixes["mid_block.attentions.0"] = "middle_block.1"
    index = 0
    for i, kind in enumerate(up_types):
        attention = _has_attention(kind, UP_BLOCKS, "up")
        # One layer more than the mirrored down block: it also consumes the skip of that block's downsampler/conv_in.
        for j in range(per_block[len(up_types) - 1 - i] + 1):
            if attention:
                prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
    return prefixes


def _has_attention(kind: str | None, known: dict, side: str) -> bool:
    if kind not in known:
        raise ValueError(f"cannot name {side} block type {kind!r} in the kohya format: its SGM layout is known only "
                         f"for {', '.join(map(str, known))}; export --format diffusers instead")
    return known[kind]


def kohya_names(config: Mapping[str, Any], modules: Iterable[str]) -> dict[str, str]:
    """Return {diffusers module path: kohya LoRA name} for U-Net modules, e.g.
    `mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0` -> `lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0`.

    Raises ValueError naming the first module outside the attention blocks of `sgm_prefixes(config)` (only those
    have SGM names here) and any two modules that would get the same name.
    """
    prefixes = sgm_prefixes(config)
    names, owners = {}, {}
    for module in modules:
        block = next((p for p in prefixes if module.startswith(p + ".")), None)
        if block is None:
            raise ValueError(
                f"cannot name U-Net module {module!r} in the kohya format: only modules inside the attention blocks "
                f"({', '.join(sorted(prefixes)[:3])}, ...) have SGM names here; choose attention projections as "
                "target_modules or export --format diffusers"
            )
        name = PREFIX + (prefixes[block] + module[len(block) :]).replace(".", "_")
        if name in owners:
            raise ValueError(f"U-Net modules {owners[name]!r} and {module!r} would share the kohya name {name!r}")
        names[module], owners[name] = name, module
    return names


def to_kohya(
    peft_tensors: Mapping[str, torch.Tensor], names: Mapping[str, str], alpha: float
) -> dict[str, torch.Tensor]:
    """Return the kohya-format tensors for a collapsed PEFT adapter state dict (keys `<module>.lora_A.weight`,
    `<module>.lora_B.weight`, `<module>.lora_magnitude_vector`), with `names` from `kohya_names`.

    `alpha` is written per layer as a float32 scalar (loaders read it with `.item()`; float32 keeps e.g. 0.3 exact
    where a half-precision file would round it). Raises ValueError on a key that is not a collapsed LoRA tensor.
    """
    out = {}
    for key, value in peft_tensors.items():
        module, _, kind = key.partition(".lora_")
        if module not in names:
            raise ValueError(f"cannot convert {key!r} to the kohya format: {module!r} is not an adapted module")
        name = names[module]
        if kind == "A.weight":
            out[f"{name}.lora_down.weight"] = value  # (r, d_in)
        elif kind == "B.weight":
            out[f"{name}.lora_up.weight"] = value  # (d_out, r)
        elif kind == "magnitude_vector":
            out[f"{name}.dora_scale"] = value[:, None]  # (d_out,) -> (d_out, 1): LyCORIS' output-axis layout
        else:
            raise ValueError(f"cannot convert {key!r} to the kohya format: not a collapsed LoRA/DoRA tensor")
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def kohya_metadata(rank: int, alpha: float, use_dora: bool, comment: str, run_config: dict | None = None,
                   steps: int | None = None) -> dict[str, str]:
    """Return the sd-scripts (`ss_*`) and ModelSpec (`modelspec.*`) header entries that LoRA tools display.

    `ss_v2`, `ss_base_model_version`, `ss_network_module`, `ss_network_dim`, `ss_network_alpha` and
    `ss_network_args` are sd-scripts' minimum set; the rest come from the run's config when given, computed as
    sd-scripts' `train_network.py` does: `ss_num_epochs` = ceil(total steps / steps per epoch), `ss_epoch` = the
    epochs the weights have seen (the planned number once the run finished, the completed ones when it stopped
    early), `ss_optimizer` = the optimizer class's module path with its arguments. Models are named, never
    located: a hub id, or a file name with its hashes (`ss_sd_model_hash`, `ss_new_sd_model_hash`). Nothing
    time-dependent, so equal runs write equal headers. A DoRA adapter is labelled as LyCORIS' LoRA with
    output-axis weight decomposition, the network whose `dora_scale` has this layout. `sshs_hashes` comes last,
    once the tensors are final.
    """
    meta = {
        "ss_v2": "False",
        "ss_base_model_version": SDXL_MODEL_VERSION,
        "ss_network_module": "lycoris.kohya" if use_dora else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_training_comment": comment,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": SDXL_ARCHITECTURE,
        "modelspec.implementation": SGM_IMPLEMENTATION,
    }
    if use_dora:
        meta["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    if steps is not None:
        meta["ss_steps"] = str(steps)
    if run_config is not None:
        train = run_config["train"]
        resolution = train["resolution"]
        output_name = Path(train["output_dir"]).name
        meta.update(
            ss_output_name=output_name,
            ss_resolution=str((resolution, resolution)),
            ss_num_train_images=str(run_config["dataset"]["images"]),
            ss_batch_size_per_device=str(train["batch_size"]),
            ss_learning_rate=str(train["lr"]),
            ss_unet_lr=str(train["lr"]),
            ss_lr_scheduler="constant",
            ss_optimizer=f"{OPTIMIZER.__module__}.{OPTIMIZER.__name__}(weight_decay={train['weight_decay']})",
            ss_mixed_precision=str(train["mixed_precision"]),
            ss_gradient_checkpointing=str(bool(train["gradient_checkpointing"])),
            ss_seed=str(train["seed"]),
            ss_cache_latents=str(bool(train["cache_latents"])),
            **_model_entries("sd_model", run_config["base"]),
            **_model_entries("vae", train.get("vae")),
            **_epochs(run_config.get("schedule"), steps),
        )
        meta["modelspec.title"] = output_name
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    return meta


# The optimizer `pipelines.train.adamw` builds; sd-scripts names it by module path (library/train_util.py get_optimizer).
OPTIMIZER = torch.optim.AdamW


def _model_entries(kind: str, source: str | None) -> dict[str, str]:
    """sd-scripts' `ss_<kind>_name`, and for a local file `ss_<kind>_hash` (the legacy 8-digit model hash) and
    `ss_new_<kind>_hash` (SHA-256); `kind` is `sd_model` or `vae`. A folder or hub id is named only."""
    identity = model_identity(source)
    if identity is None:
        return {}
    entries = {f"ss_{kind}_name": identity["name"]}
    if "sha256" in identity:
        entries[f"ss_{kind}_hash"] = legacy_model_hash(Path(source).expanduser())
        entries[f"ss_new_{kind}_hash"] = identity["sha256"]
    return entries


def legacy_model_hash(path: Path) -> str:
    """AUTOMATIC1111's old checkpoint hash, as sd-scripts' `train_util.model_hash` computes it: the first 8 hex
    digits of the SHA-256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _epochs(schedule: dict | None, steps: int | None) -> dict[str, str]:
    """`ss_num_batches_per_epoch`, `ss_max_train_steps`, `ss_num_epochs` and `ss_epoch` from the run's schedule.

    As sd-scripts' `train_network.py`: num_epochs = ceil(max_train_steps / batches per epoch); the final save
    records epoch = num_epochs, a save within the run the epochs completed. Runs written before the schedule was
    recorded get none of them (what their epochs were cannot be known without their data).
    """
    if schedule is None:
        return {}
    per_epoch, total = schedule["steps_per_epoch"], schedule["total_steps"]
    num_epochs = math.ceil(total / per_epoch)
    done = total if steps is None else steps
    return {
        "ss_num_batches_per_epoch": str(per_epoch),
        "ss_max_train_steps": str(total),
        "ss_num_epochs": str(num_epochs),
        "ss_epoch": str(num_epochs if done >= total else done // per_epoch),
    }


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """Return sd-scripts' `sshs_model_hash` and `sshs_legacy_hash` for a file of `tensors` with this header.

    As `library/train_util.py` `precalculate_safetensors_hashes`: serialize the tensors with only the `ss_*`
    entries of the header; the model hash is the SHA-256 of everything after the header (the tensor data, so it
    equals the hash AUTOMATIC1111 computes of the written file, `addnet_hash_safetensors`), the legacy hash the
    first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (`addnet_hash_legacy`).
    """
    data = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(data[8 + header :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    }
