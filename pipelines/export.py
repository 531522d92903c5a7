"""Write a trained adapter as LoRA files, one per loader family, each saying in its header which program it is for.

diffusers format (`lora.safetensors`): exactly what `StableDiffusionXLPipeline.save_lora_weights(dir,
unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())`
writes: keys `unet.<module>.lora_A.weight`, `unet.<module>.lora_B.weight` (and `unet.<module>.lora_magnitude_vector`
for DoRA methods), and the PEFT LoraConfig as JSON under the header key `lora_adapter_metadata`, which is how
diffusers learns `lora_alpha` (without it, alpha != rank would load at the wrong scale). Exact in diffusers for
every method; no other program reads these keys.

kohya key layout (`lora_unet_<SGM module path>.lora_down/.lora_up/.alpha`, see `pipelines.kohya`):
- LoRA methods: `lora_kohya.safetensors`, exact in ComfyUI, AUTOMATIC1111/Forge, sd-scripts and diffusers.
- DoRA methods: no `dora_scale` is read the same by every loader (`pipelines.dora_files`), so three files:
  `lora_lycoris.safetensors` (LyCORIS' formula: LyCORIS, sd-scripts with LyCORIS), `lora_comfyui.safetensors` (the
  magnitude compensated for ComfyUI's and Forge's current formula) and `lora_a1111.safetensors` (a plain LoRA of a
  higher rank approximating the DoRA update by truncated SVD, for AUTOMATIC1111, diffusers' kohya loader and any
  loader without DoRA; its error is measured and written into its header and the log).

Every header carries the method, rank, alpha, targets, base model (named, never located: see
`pipelines.provenance`), dataset hash, steps, resolution, CMMD when `opdiff eval` measured it, the opdiff version,
and `opdiff_file` / `opdiff_for` / `opdiff_exactness`: which file this is, for which programs, and how exact. The
kohya-keyed headers also have sd-scripts' `ss_*` and `sshs_*` keys.
"""

from __future__ import annotations

import json
import logging
import math
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
from pipelines import dora_files, kohya
from pipelines.model import load_pipeline
from pipelines.provenance import model_identity, scrub_paths, shipped_config
from pipelines.rundir import RunDir

# `both` (every file the method needs) and `kohya` (every kohya-keyed one) are families; the rest single files.
FORMATS = ("diffusers", "kohya", "both")
DORA_FORMATS = ("lycoris", "comfyui", "a1111")
ALL_FORMATS = FORMATS + DORA_FORMATS
DEFAULT_SVD_RANK = 32  # the a1111 file's rank unless chosen: at least twice the adapter's (see `svd_rank`)
ExportFormat = Literal["both", "diffusers", "kohya", "lycoris", "comfyui", "a1111"]
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
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:  # also when interrupted: no temporary file is left behind
        tmp.unlink(missing_ok=True)
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


@dataclass(frozen=True)
class FileKind:
    """One kind of exported file: its name suffix, the programs it is for and how exactly they reproduce the run."""

    name: str
    """The `--format` value and the header's `opdiff_file`."""
    suffix: str
    """Added to the file name's stem: `lora.safetensors` -> `lora_kohya.safetensors`."""
    programs: str
    """The programs that load it as intended, and how."""
    exactness: str
    """How exactly they reproduce the trained model; the a1111 file's measured error is added when written."""


KINDS = {
    "diffusers": FileKind("diffusers", "", "diffusers: pipe.load_lora_weights(file)", "exact"),
    "kohya": FileKind("kohya", "_kohya", "ComfyUI, AUTOMATIC1111, Forge, sd-scripts, diffusers (kohya keys)",
                      "exact"),
    "lycoris": FileKind("lycoris", "_lycoris",
                        "LyCORIS and sd-scripts with LyCORIS (DoRA as LyCORIS computes it); ComfyUI and Forge once "
                        "they normalise output-axis DoRA by the adapted weight (a proposed fix)", "exact"),
    "comfyui": FileKind("comfyui", "_comfyui",
                        "ComfyUI and Forge as they are now (DoRA magnitude compensated for their formula; only with "
                        "the base model it was trained on)", "exact"),
    "a1111": FileKind("a1111", "_a1111",
                      "AUTOMATIC1111, diffusers' kohya loader, and any program without DoRA (a plain LoRA)",
                      "approximate"),
}


def method_kinds(method: str) -> tuple[str, ...]:
    """Return the kinds of file `method` exports with `format="both"`, diffusers first."""
    if opdiff.METHODS[method].use_dora:
        return ("diffusers", "lycoris", "comfyui", "a1111")
    return ("diffusers", "kohya")


def kinds_for(format: str, method: str) -> tuple[str, ...]:
    """Return the kinds of file `format` selects for a run of `method`.

    `both`: every kind the method needs; `kohya`: its kohya-keyed ones; a single kind otherwise. Raises ValueError
    for an unknown format, or one that does not fit the method (the DoRA files for a LoRA method, and back).
    """
    if format not in ALL_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(ALL_FORMATS)}")
    own = method_kinds(method)
    if format == "both":
        return own
    if format == "kohya":
        return tuple(k for k in own if k != "diffusers")
    if format not in own:  # a DoRA file for a LoRA method
        dora = ", ".join(name for name, m in opdiff.METHODS.items() if m.use_dora)
        raise ValueError(f"--format {format} is for DoRA methods ({dora}); this run trained {method}, whose "
                         "kohya file is exact in every loader: use --format kohya")
    return (format,)


def output_files(out_file: str | Path, kinds: tuple[str, ...] | str = ("diffusers", "kohya"),
                 suffixed: bool | None = None) -> dict[str, Path]:
    """Return {kind: file} for one export, every name derived from `out_file`.

    One kind gets `out_file` itself unless `suffixed`; several (or `suffixed=True`) get the kind's suffix before
    the extension (`lora.safetensors` -> `lora_kohya.safetensors`), except diffusers, which keeps the name.
    """
    out_file = Path(out_file)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if suffixed is None:
        suffixed = len(kinds) > 1
    if not suffixed:
        return {kinds[0]: out_file}
    return {k: out_file.with_name(f"{out_file.stem}{KINDS[k].suffix}{out_file.suffix}") for k in kinds}


def resolve_svd_rank(rank: int, chosen: int | None = None) -> int:
    """The a1111 file's rank: `chosen`, or DEFAULT_SVD_RANK but at least twice the adapter's rank (the B A part of
    the DoRA update alone has the adapter's rank; its magnitude part is full rank)."""
    if chosen is not None:
        if chosen < 1:
            raise ValueError(f"--svd-rank must be at least 1, got {chosen}")
        return chosen
    return max(DEFAULT_SVD_RANK, 2 * rank)


def export(
    source: str | Path | nn.Module,
    out_file: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    run_config: dict | None = None,
    format: str = "both",
    svd_rank: int | None = None,
    suffixed: bool | None = None,
) -> dict[str, Path]:
    """Collapse an adapter and write it as LoRA `.safetensors` file(s); return {kind: file written}.

    `source` is a trained, injected U-Net (collapsed in place) or a run folder, whose base model is loaded and
    given the uncollapsed adapter from `adapter_training.safetensors`. `format` selects the files (`kinds_for`):
    `both` (default) writes every file the method needs, `kohya` its kohya-keyed ones, or one kind by name. For a
    run folder `out_file` defaults to its `lora.safetensors` and the kinds' suffixed names beside it
    (`lora-fp16.safetensors`, `lora-fp16_kohya.safetensors`, ... in half precision); otherwise names come from
    `output_files(out_file, kinds, suffixed)`. `svd_rank` sets the a1111 file's rank (see `resolve_svd_rank`).
    `run_config`, the run's resolved config (read from the run folder when `source` is one), goes into the
    headers, paths reduced to names; so do the steps in the run's `losses.csv` and the score in its `cmmd.json`.
    Each file is logged with the programs it is for (`describe`). Nothing is written unless every file can be:
    raises ValueError for non-finite tensors (naming them), and for a module the kohya layout cannot name when a
    kohya-keyed kind is asked for by name (`both` then writes the diffusers file alone and logs why).
    """
    if dtype not in DTYPE_SUFFIXES:
        raise ValueError(f"cannot export in {dtype}; choose float32, float16 or bfloat16")
    if format not in ALL_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(ALL_FORMATS)}")
    if isinstance(source, nn.Module):
        if out_file is None:
            raise ValueError("out_file is required when exporting a model object")
        unet = source
        run = RunDir(run_config["train"]["output_dir"]) if run_config is not None else None
    else:
        run = RunDir(source)
        unet, run_config = _unet_from_run(run)
    config: opdiff.AdapterConfig = unet.opdiff_config
    kinds = kinds_for(format, config.method)
    rank_svd = resolve_svd_rank(config.rank, svd_rank)
    opdiff.collapse(unet)
    if format == "both" and (reason := _kohya_unsupported(unet)):
        # A run that adapted modules outside the attention blocks still gets its diffusers file.
        log.warning("writing the diffusers format only: %s", reason)
        kinds = ("diffusers",)
    steps, cmmd = (run.steps_done(), run.read_cmmd()) if run is not None else (None, None)
    if out_file is None:  # the run folder's own names (partial ones for a stopped run), suffixed whatever is asked for
        lora = run.lora_for(steps, (run_config or {}).get("schedule", {}).get("total_steps"))
        files = output_files(lora.with_stem(lora.stem + DTYPE_SUFFIXES[dtype]), kinds, suffixed=True)
    else:
        files = output_files(out_file, kinds, suffixed)
    shared = _shared_metadata(config, run_config, steps, cmmd)
    contents = {}  # kind -> (tensors, header); every file is checked before the first one is written
    for kind in files:
        tensors, header = _contents(kind, unet, dtype, run_config, steps, rank_svd)
        contents[kind] = (_finite(tensors, dtype), {**header, **shared})
    for kind, (tensors, header) in contents.items():
        if kind != "diffusers":  # sd-scripts' hashes of the final tensors and ss_* entries
            header.update(kohya.sshs_hashes(tensors, header))
    written = {kind: atomic_save(tensors, files[kind], header) for kind, (tensors, header) in contents.items()}
    for path in written.values():
        log.info("%s", describe(path))
    return written


def describe(file: str | Path) -> str:
    """Return two lines naming an exported file, then the programs it is for and how exact it is (`purpose`)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        kind = (f.metadata() or {}).get("opdiff_file", "")
    return f"LoRA ({kind or 'unknown'}): {file}\n    {purpose(file)}"


def purpose(file: str | Path) -> str:
    """Return `for <programs>; <exactness>` as an exported file's header states it (e.g. `for diffusers:
    pipe.load_lora_weights(file); exact`), or a note that the file does not say."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if "opdiff_for" not in meta:
        return "its header does not say which programs it is for (written by another tool or an older opdiff)"
    return f"for {meta['opdiff_for']}; {meta['opdiff_exactness']}"


def _contents(kind: str, unet: nn.Module, dtype: torch.dtype, run_config: dict | None, steps: int | None,
              rank_svd: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and kind-specific header of one file (the shared `opdiff_*` entries are added by `export`)."""
    config: opdiff.AdapterConfig = unet.opdiff_config
    label = {"opdiff_file": kind, "opdiff_for": KINDS[kind].programs, "opdiff_exactness": KINDS[kind].exactness}
    if kind == "diffusers":
        lora_meta = json.dumps(lora_adapter_metadata(unet), indent=2, sort_keys=True)
        return lora_tensors(unet, dtype), {"format": "pt", LORA_ADAPTER_METADATA_KEY: lora_meta, **label}
    use_dora = kind in ("lycoris", "comfyui")
    tensors = kohya_tensors(unet, dtype) if kind != "a1111" else {}
    rank, alpha = config.rank, config.alpha
    what = f"plain rank-{config.rank} {'DoRA' if use_dora else 'LoRA'}"
    if kind == "comfyui":
        names = _kohya_names(unet)
        for layer in dora_files.dora_layers(unet):
            tensors[f"{names[layer.name]}.dora_scale"] = dora_files.comfyui_scale(layer).to("cpu", dtype).contiguous()
        note = ("compensated for ComfyUI's output-axis DoRA, (W0 + alpha/r up down) * dora_scale / ||W0||_row: "
                "dora_scale = m * ||W0||_row / ||W0 + alpha/r up down||_row")
        if run_config is not None:  # W0 is the training base's: say which one
            base = model_identity(run_config["base"])
            note += f"; W0 is the base model {base['name']}" + (f" (sha256 {base['sha256']})" if "sha256" in base else "")
        label["opdiff_dora_scale"] = note
        what += ", magnitude for ComfyUI/Forge"
    elif kind == "a1111":
        tensors, errors = _svd_tensors(unet, rank_svd, dtype)
        rank, alpha = rank_svd, float(rank_svd)
        what = f"rank-{rank_svd} plain LoRA approximating a rank-{config.rank} DoRA"
        label.update(errors)
        label["opdiff_exactness"] = (f"approximate: relative error {float(errors['opdiff_svd_relative_error']):.4g} "
                                     f"of the DoRA update (largest layer {float(errors['opdiff_svd_max_layer_error']):.4g})")
    comment = f"opdiff {opdiff.__version__}: {config.method}, collapsed into a {what}; for {KINDS[kind].programs}"
    header = {"format": "pt", **kohya.kohya_metadata(rank, alpha, use_dora, comment, run_config, steps), **label}
    return tensors, header


def _kohya_names(unet: nn.Module) -> dict[str, str]:
    return kohya.kohya_names(unet.config, (a.name for a in opdiff.adapted_layers(unet)))


def _svd_tensors(unet: nn.Module, rank: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The a1111 file's kohya tensors (each DoRA layer's update by truncated SVD) and its `opdiff_svd_*` entries:
    the rank, the relative Frobenius error over all layers, the largest layer's, and every layer's by kohya name."""
    names = _kohya_names(unet)
    tensors, layer_errors, residual_sq, update_sq = {}, {}, 0.0, 0.0
    for layer in dora_files.dora_layers(unet):
        approx = dora_files.svd_lora(layer, rank, dtype)
        name = names[layer.name]
        tensors[f"{name}.lora_down.weight"] = approx.down.to("cpu")  # (R, d_in)
        tensors[f"{name}.lora_up.weight"] = approx.up.to("cpu")  # (d_out, R)
        tensors[f"{name}.alpha"] = torch.tensor(approx.alpha, dtype=torch.float32)
        layer_errors[name] = approx.error
        residual_sq += approx.residual_norm**2
        update_sq += approx.update_norm**2
    total = math.sqrt(residual_sq / update_sq) if update_sq > 0 else 0.0
    return tensors, {
        "opdiff_svd_rank": str(rank),
        "opdiff_svd_relative_error": repr(total),
        "opdiff_svd_max_layer_error": repr(max(layer_errors.values(), default=0.0)),
        "opdiff_svd_layer_errors": json.dumps(layer_errors, sort_keys=True),
    }


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
    """Return the `opdiff_*` header entries every file carries (what was trained, on what, and how well).

    The base model is named (`model_identity`: a hub id, or a file name with its SHA-256) and the run's config is
    `shipped_config`: no path of the trainer's machine goes into a file that is shared.
    """
    meta = {
        "opdiff_version": opdiff.__version__,
        "opdiff_method": config.method,
        "opdiff_rank": str(config.rank),
        "opdiff_alpha": str(float(config.alpha)),
        "opdiff_targets": json.dumps(list(config.target_modules)),
        "opdiff_adapter": json.dumps(scrub_paths(config.to_dict()), sort_keys=True),
    }
    if run_config is not None:
        base = model_identity(run_config["base"])
        meta.update(
            opdiff_base=base["name"],
            opdiff_dataset_hash=str(run_config["dataset"]["hash"]),
            opdiff_resolution=str(run_config["train"]["resolution"]),
            opdiff_config=json.dumps(shipped_config(run_config), sort_keys=True),
        )
        if "sha256" in base:
            meta["opdiff_base_sha256"] = base["sha256"]
    if steps is not None:
        meta["opdiff_steps"] = str(steps)
        planned = (run_config or {}).get("schedule", {}).get("total_steps")
        if planned is not None and steps < planned:
            meta["opdiff_partial"] = f"stopped after {steps} of {planned} planned steps"
    if cmmd is not None:
        meta["opdiff_cmmd"] = json.dumps(scrub_paths(cmmd), sort_keys=True)
    return meta


def _unet_from_run(run: RunDir) -> tuple[nn.Module, dict]:
    """Load a run's base U-Net with its trained, uncollapsed adapter; return it and the run config."""
    for p in (run.config, run.training_state):
        if not p.is_file():
            raise FileNotFoundError(f"{run.path} is not a finished or checkpointed run: {p.name} is missing")
    run_config = run.read_config()
    try:  # before the base model loads
        state = load_file(run.training_state)
    except Exception as e:  # noqa: BLE001 - safetensors reports a damaged file in several types
        again = (f"opdiff train --resume {run.path} writes it again from checkpoint.pt" if run.checkpoint.is_file()
                 else "restore it from a copy")
        raise ValueError(f"cannot export {run.path}: {run.training_state} is damaged ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); {again}") from None
    unet = load_pipeline(run_config["base"], device="cpu").unet
    opdiff.inject(unet, opdiff.AdapterConfig.from_saved(run_config["adapter"]))
    opdiff.load_training_state_dict(unet, state)
    return unet, run_config


@dataclass
class ExportConfig(Settings):
    """`opdiff export`: which run, which files, which dtype, where."""

    run_dir: Path = option(help="A run folder written by `opdiff train`.", group="run", positional=True)
    format: ExportFormat = option(
        "both", "Which files: `both` every file the method needs, `kohya` its kohya-keyed ones, or one by name "
        "(lycoris, comfyui, a1111: DoRA methods only); several files are named <name>_<format>.safetensors beside "
        "the diffusers one.", group="basic")
    out: Path | None = option(None, "Where to write the (diffusers) file.", group="basic",
                              none_means="<run folder>/lora.safetensors (lora-fp16.safetensors, ... in half "
                              "precision)")
    dtype: ExportDtype = option("fp32", "Tensor precision in the file: fp32 is exact; fp16 and bf16 halve the size.",
                                group="basic")
    svd_rank: int | None = option(
        None, "Rank of the a1111 file of a DoRA run, which approximates the DoRA update by truncated SVD: higher is "
        "closer and larger.", minimum=1, none_means=f"{DEFAULT_SVD_RANK}, at least twice the adapter's rank",
        label="SVD rank", group="basic")


def export_run(cfg: ExportConfig) -> dict[str, Path]:
    """Export the run `cfg.run_dir` as `cfg` says; return {kind: file written}."""
    return export(cfg.run_dir, cfg.out, DTYPE_NAMES[cfg.dtype], format=cfg.format, svd_rank=cfg.svd_rank)
