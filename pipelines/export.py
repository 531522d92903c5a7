"""Write a trained adapter as plain LoRA files: diffusers/PEFT keys and kohya keys, the run described in the header.

diffusers format (`lora.safetensors`): exactly what `StableDiffusionXLPipeline.save_lora_weights(dir,
unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())`
writes: keys `unet.<module>.lora_A.weight`, `unet.<module>.lora_B.weight` (and `unet.<module>.lora_magnitude_vector`
for DoRA methods), and the PEFT LoraConfig as JSON under the header key `lora_adapter_metadata`, which is how
diffusers learns `lora_alpha` (without it, alpha != rank would load at the wrong scale).

kohya format (`lora_kohya.safetensors`): `lora_unet_<SGM module path>.lora_down/.lora_up/.alpha` (see
`pipelines.kohya`), what ComfyUI, AUTOMATIC1111/Forge and kohya read, and what diffusers' `load_lora_weights`
converts itself. DoRA methods add `dora_scale`, which loaders apply differently (see `pipelines.kohya`); for them
the diffusers file is the exact one.

Both headers carry the method, rank, alpha, targets, base model, dataset hash, steps, resolution, CMMD when
`opdiff eval` measured it, and the opdiff version; the kohya header also has sd-scripts' `ss_*` keys.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

import opdiff
from opdiff.settings import Settings, option
from pipelines import kohya
from pipelines.model import load_pipeline
from pipelines.rundir import RunDir

FORMATS = ("diffusers", "kohya", "both")
ExportFormat = Literal["diffusers", "kohya", "both"]
ExportDtype = Literal["fp32", "fp16", "bf16", "float32", "float16", "bfloat16"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The export dtypes by their short names (kohya's `--save_precision` names); the GUI offers these."""
DTYPE_NAMES = {**DTYPES, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""What the command line accepts: the short names and torch's."""
# Short dtype names for default file names; float32 files get none (`lora.safetensors`).
DTYPE_SUFFIXES = {torch.float32: "", torch.float16: "-fp16", torch.bfloat16: "-bf16"}
# diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY and the prefix `load_lora_weights` expects for the U-Net.
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
UNET_PREFIX = "unet"

log = logging.getLogger(__name__)


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file via a temporary file and a rename, so a crash never leaves half a file. Returns path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def peft_tensors(unet: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Return the collapsed adapter of `unet` in PEFT keys (`<module>.lora_A.weight`, ...), on CPU in `dtype`.

    Raises ValueError naming the first tensor that is still reparameterized (call `opdiff.collapse` first).
    """
    for name, module in unet.named_modules():
        if parametrize.is_parametrized(module):
            tensor = next(iter(module.parametrizations))
            raise ValueError(f"refusing to export: the adapter is not collapsed ({name}.{tensor} is still computed "
                             "from training parameters); call opdiff.collapse(model) first")
    state = get_peft_model_state_dict(unet, adapter_name=opdiff.ADAPTER_NAME)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def lora_tensors(unet: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Return the collapsed adapter of `unet` in diffusers keys (`unet.<module>.lora_A.weight`, ...) on CPU."""
    return {f"{UNET_PREFIX}.{k}": v for k, v in peft_tensors(unet, dtype).items()}


def kohya_tensors(unet: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Return the collapsed adapter of `unet` in kohya keys (`lora_unet_<sgm path>.lora_down.weight`, ...) on CPU.

    Raises ValueError for an uncollapsed adapter or a module without an SGM name (see `pipelines.kohya`).
    """
    tensors = peft_tensors(unet, dtype)
    names = kohya.kohya_names(unet.config, (a.name for a in opdiff.adapted_layers(unet)))
    return kohya.to_kohya(tensors, names, unet.opdiff_config.alpha)


def lora_adapter_metadata(unet: nn.Module) -> dict:
    """Return the PEFT LoraConfig of `unet` as diffusers stores it: keys prefixed `unet.`, sets as lists."""
    config = unet.peft_config[opdiff.ADAPTER_NAME].to_dict()
    return {f"{UNET_PREFIX}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def output_files(out_file: str | Path, format: str = "both") -> dict[str, Path]:
    """Return {format: file} for one export: `out_file` itself, and with `both` the kohya file beside it with
    `_kohya` before the suffix (`lora.safetensors` -> `lora_kohya.safetensors`)."""
    out_file = Path(out_file)
    if format != "both":
        return {format: out_file}
    return {"diffusers": out_file, "kohya": out_file.with_name(f"{out_file.stem}_kohya{out_file.suffix}")}


def export(
    source: str | Path | nn.Module,
    out_file: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    run_config: dict | None = None,
    format: str = "both",
) -> dict[str, Path]:
    """Collapse an adapter and write it as plain LoRA `.safetensors` file(s); return {format: file written}.

    `source` is a trained, injected U-Net (collapsed in place) or a run folder, whose base model is loaded and
    given the uncollapsed adapter from `adapter_training.safetensors`. `format` is `diffusers`, `kohya` or `both`
    (files named by `output_files`). For a run folder `out_file` defaults to its `lora.safetensors` and
    `lora_kohya.safetensors` (`lora-fp16.safetensors`, `lora-fp16_kohya.safetensors`, ... in half precision).
    `run_config`, the run's resolved config (read from the run folder when `source` is one), goes into the
    headers; so do the steps in the run's `losses.csv` and the score in its `cmmd.json`.
    Nothing is written unless every file can be: raises ValueError for non-finite tensors (naming them), and for
    a module the kohya format cannot name when `format="kohya"` (`both` then writes the diffusers file alone and
    logs why).
    """
    if dtype not in DTYPE_SUFFIXES:
        raise ValueError(f"cannot export in {dtype}; choose float32, float16 or bfloat16")
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if isinstance(source, nn.Module):
        if out_file is None:
            raise ValueError("out_file is required when exporting a model object")
        unet = source
        run = RunDir(run_config["train"]["output_dir"]) if run_config is not None else None
    else:
        run = RunDir(source)
        unet, run_config = _unet_from_run(run)
    if out_file is None:  # the run folder's own names, whichever formats are asked for
        default = output_files(run.lora.with_stem(run.lora.stem + DTYPE_SUFFIXES[dtype]))
        files = {fmt: path for fmt, path in default.items() if format in (fmt, "both")}
    else:
        files = output_files(out_file, format)
    opdiff.collapse(unet)
    config: opdiff.AdapterConfig = unet.opdiff_config
    use_dora = opdiff.METHODS[config.method].use_dora
    if format == "both" and (reason := _kohya_unsupported(unet)):
        # A run that adapted modules outside the attention blocks still gets its diffusers file.
        log.warning("writing the diffusers format only: %s", reason)
        del files["kohya"]
    steps, cmmd = (run.steps_done(), run.read_cmmd()) if run is not None else (None, None)
    shared = _shared_metadata(config, run_config, steps, cmmd)
    contents = {}  # format -> (tensors, header); every file is checked before the first one is written
    if "diffusers" in files:
        lora_meta = json.dumps(lora_adapter_metadata(unet), indent=2, sort_keys=True)
        header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: lora_meta, **shared}
        contents["diffusers"] = (_finite(lora_tensors(unet, dtype), dtype), header)
    if "kohya" in files:
        comment = (f"opdiff {opdiff.__version__}: {config.method}, collapsed into a plain rank-{config.rank} "
                   f"{'DoRA' if use_dora else 'LoRA'}")
        header = {"format": "pt", **kohya.kohya_metadata(config.rank, config.alpha, use_dora, comment, run_config,
                                                         steps), **shared}
        contents["kohya"] = (_finite(kohya_tensors(unet, dtype), dtype), header)
    return {fmt: atomic_save(tensors, files[fmt], header) for fmt, (tensors, header) in contents.items()}


def _kohya_unsupported(unet: nn.Module) -> str | None:
    """Return why the kohya format cannot name this U-Net's adapted modules, or None when it can."""
    try:
        kohya.kohya_names(unet.config, (a.name for a in opdiff.adapted_layers(unet)))
    except ValueError as e:
        return str(e)
    return None


def _finite(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Return `tensors` unchanged; raise ValueError naming the ones that hold NaN or inf."""
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"refusing to export: {len(bad)} tensor(s) hold NaN/inf in {dtype} (first: {', '.join(bad[:3])}); "
            "the training diverged (lower the learning rate) or the values overflow this dtype (export float32)"
        )
    return tensors


def _shared_metadata(config: opdiff.AdapterConfig, run_config: dict | None, steps: int | None,
                     cmmd: dict | None) -> dict[str, str]:
    """Return the `opdiff_*` header entries both formats carry (what was trained, on what, and how well)."""
    meta = {
        "opdiff_version": opdiff.__version__,
        "opdiff_method": config.method,
        "opdiff_rank": str(config.rank),
        "opdiff_alpha": str(float(config.alpha)),
        "opdiff_targets": json.dumps(list(config.target_modules)),
        "opdiff_adapter": json.dumps(config.to_dict(), sort_keys=True),
    }
    if run_config is not None:
        meta.update(
            opdiff_base=str(run_config["base"]),
            opdiff_dataset_hash=str(run_config["dataset"]["hash"]),
            opdiff_resolution=str(run_config["train"]["resolution"]),
            opdiff_config=json.dumps(run_config, sort_keys=True),
        )
    if steps is not None:
        meta["opdiff_steps"] = str(steps)
    if cmmd is not None:
        meta["opdiff_cmmd"] = json.dumps(cmmd, sort_keys=True)
    return meta


def _unet_from_run(run: RunDir) -> tuple[nn.Module, dict]:
    """Load a run's base U-Net with its trained, uncollapsed adapter; return it and the run config."""
    for p in (run.config, run.training_state):
        if not p.is_file():
            raise FileNotFoundError(f"{run.path} is not a finished or checkpointed run: {p.name} is missing")
    run_config = run.read_config()
    unet = load_pipeline(run_config["base"], device="cpu").unet
    opdiff.inject(unet, opdiff.AdapterConfig.from_dict(run_config["adapter"]))
    opdiff.load_training_state_dict(unet, load_file(run.training_state))
    return unet, run_config


@dataclass
class ExportConfig(Settings):
    """`opdiff export`: which run, which key layout, which dtype, where."""

    run_dir: Path = option(help="A run folder written by `opdiff train`.", group="run", positional=True)
    format: ExportFormat = option("both", "Key layout: diffusers (pipe.load_lora_weights), kohya (ComfyUI, "
                                  "AUTOMATIC1111/Forge, kohya; diffusers reads it too), or both; `both` writes the "
                                  "kohya file beside the diffusers one as <name>_kohya.safetensors.", group="basic")
    out: Path | None = option(None, "Where to write the (diffusers) file.", group="basic", none_means="<run folder>/lora.safetensors "
                              "(lora-fp16.safetensors, ... in half precision)")
    dtype: ExportDtype = option("fp32", "Tensor precision in the file: fp32 is exact; fp16 and bf16 halve the size.",
                                group="basic")


def export_run(cfg: ExportConfig) -> dict[str, Path]:
    """Export the run `cfg.run_dir` as `cfg` says; return {format: file written}."""
    return export(cfg.run_dir, cfg.out, DTYPE_NAMES[cfg.dtype], format=cfg.format)
