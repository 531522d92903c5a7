"""Write a trained adapter as a plain LoRA file that `StableDiffusionXLPipeline.load_lora_weights` reads.

The file is what `StableDiffusionXLPipeline.save_lora_weights(dir, unet_lora_layers=get_peft_model_state_dict(unet),
unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())` writes: keys `unet.<module>.lora_A.weight`,
`unet.<module>.lora_B.weight` (and `unet.<module>.lora_magnitude_vector` for DoRA methods), and the PEFT
LoraConfig as JSON under the header key `lora_adapter_metadata`, which is how diffusers learns `lora_alpha`
(without it, alpha != rank would load at the wrong scale). opdiff adds the method, its version and the run's
config to the same header.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

import opdiff

CONFIG_FILE = "config.json"
TRAINING_FILE = "adapter_training.safetensors"
LORA_FILE = "lora.safetensors"
# diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY and the prefix `load_lora_weights` expects for the U-Net.
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
UNET_PREFIX = "unet"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file via a temporary file and a rename, so a crash never leaves half a file. Returns path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def lora_tensors(unet: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Return the collapsed adapter of `unet` in diffusers/PEFT keys (`unet.<module>.lora_A.weight`, ...) on CPU.

    Collapses `unet` in place first (a no-op when already collapsed). Raises ValueError naming non-finite tensors.
    """
    opdiff.collapse(unet)
    state = get_peft_model_state_dict(unet, adapter_name=opdiff.ADAPTER_NAME)
    tensors = {f"{UNET_PREFIX}.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"refusing to export: {len(bad)} tensor(s) hold NaN/inf in {dtype} (e.g. {', '.join(bad[:3])}); "
            "the training diverged (lower the learning rate) or the values overflow this dtype (export float32)"
        )
    return tensors


def lora_adapter_metadata(unet: nn.Module) -> dict:
    """Return the PEFT LoraConfig of `unet` as diffusers stores it: keys prefixed `unet.`, sets as lists."""
    config = unet.peft_config[opdiff.ADAPTER_NAME].to_dict()
    return {f"{UNET_PREFIX}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def export(
    source: str | Path | nn.Module,
    out_file: str | Path,
    dtype: torch.dtype = torch.float32,
    run_config: dict | None = None,
) -> Path:
    """Collapse an adapter and write it as a plain LoRA `.safetensors` file; return the file's path.

    `source` is a trained, injected U-Net (collapsed in place) or a run folder, whose base model is loaded and
    given the uncollapsed adapter from `adapter_training.safetensors`. `run_config` (the run's resolved config;
    read from the run folder when `source` is one) goes into the file's metadata.
    """
    if isinstance(source, nn.Module):
        unet = source
    else:
        unet, run_config = _unet_from_run(Path(source))
    config: opdiff.AdapterConfig = unet.opdiff_config
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(lora_adapter_metadata(unet), indent=2, sort_keys=True),
        "opdiff_method": config.method,
        "opdiff_version": opdiff.__version__,
        "opdiff_adapter": json.dumps(config.to_dict(), sort_keys=True),
    }
    if run_config is not None:
        metadata["opdiff_config"] = json.dumps(run_config, sort_keys=True)
    return atomic_save(lora_tensors(unet, dtype), Path(out_file), metadata)


def _unet_from_run(run_dir: Path) -> tuple[nn.Module, dict]:
    """Load a run's base U-Net with its trained, uncollapsed adapter; return it and the run config."""
    from pipelines.model import load_pipeline

    config_path, state_path = run_dir / CONFIG_FILE, run_dir / TRAINING_FILE
    for p in (config_path, state_path):
        if not p.is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished or checkpointed run: {p.name} is missing")
    run_config = json.loads(config_path.read_text(encoding="utf-8"))
    unet = load_pipeline(run_config["base"], device="cpu").unet
    opdiff.inject(unet, opdiff.AdapterConfig.from_dict(run_config["adapter"]))
    opdiff.load_training_state_dict(unet, load_file(state_path))
    return unet, run_config
