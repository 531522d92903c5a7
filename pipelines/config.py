"""The one training configuration: a typed dataclass that is also the CLI, the GUI's form and the config file.

Every field documents itself with the string under it; `add_arguments` turns those strings into `--help` text.
Adapter fields carry the names and defaults of `opdiff.AdapterConfig` and take their help from that class.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from opdiff import DEFAULT_TARGETS, METHODS, AdapterConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO_ROOT / "assets" / "tiny-sdxl"
BUNDLED_DATA = REPO_ROOT / "assets" / "demo-data"

MixedPrecision = Literal["no", "bf16", "fp16"]
RUN_CONFIG_FILE = "config.json"  # what `train` writes into every run folder (pipelines.export.CONFIG_FILE)
# Settings a resumed run may change: they do not alter the trajectory of the steps already taken or to come
# (length, bookkeeping, where data and caches live, how memory is spent). The dataset's content is checked by
# its hash instead of its path.
RESUME_MAY_CHANGE = frozenset({
    "data", "output_dir", "resume", "max_steps", "epochs", "checkpoint_every", "device", "cache_dir",
    "cache_latents", "gradient_checkpointing", "compile", "sample_prompts", "sample_seeds", "sample_steps", "guidance_scale",
})
# A flag that turns a boolean setting off, where `--no-<name>` would read badly.
OFF_FLAGS = {"random_crop": "center_crop"}


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults train a LoRA on the bundled tiny model and demo images."""

    base: str = str(BUNDLED_MODEL)
    """Base model: a diffusers folder, a single-file `.safetensors` checkpoint, or a hub id."""
    vae: str | None = None
    """VAE to use instead of the base's (a diffusers folder, a single file, or a hub id); it runs in float32."""
    data: Path = BUNDLED_DATA
    """Dataset: a folder of images with same-name `.txt` captions or a `metadata.jsonl`, or a `.zip` of either."""
    caption: str | None = None
    """Caption for images that have none (no `.txt` file, no text in metadata.jsonl); None skips such images."""
    output_dir: Path | None = None
    """Run folder for config, losses, checkpoints and the exported LoRA; None means `runs/<method>-<time>`."""
    resume: Path | None = None
    """Continue the run in this folder from its last checkpoint, with its settings (flags may extend max_steps)."""

    # Adapter settings, passed to opdiff.AdapterConfig; their help text is that class's field documentation.
    method: str = AdapterConfig.method
    rank: int = AdapterConfig.rank
    alpha: float = AdapterConfig.alpha
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    op_width: int = AdapterConfig.op_width
    op_embed_dim: int = AdapterConfig.op_embed_dim
    mpo_cores: int = AdapterConfig.mpo_cores
    mpo_lr: float | None = AdapterConfig.mpo_lr
    select_top_n: int = AdapterConfig.select_top_n
    select_split: int = AdapterConfig.select_split
    select_every: int = AdapterConfig.select_every
    select_warmup_steps: int = AdapterConfig.select_warmup_steps
    select_batches: int = AdapterConfig.select_batches

    lr: float = 1e-4
    """AdamW learning rate, constant (op-lora.txt Sec. 5.1)."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    epochs: int = 2
    """Passes over the dataset (op-lora.txt Sec. 5.1: two epochs)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; None means `epochs` full passes."""
    batch_size: int = 1
    """Images per optimizer step."""
    resolution: int | None = None
    """Training image size in pixels; None means the base model's native size (1024 for SDXL, 64 for the bundled model)."""
    seed: int = 0
    """Seed for adapter init, data order, noise and timesteps: equal seeds give equal loss curves."""
    buckets: bool = True
    """Train each image at the SDXL aspect-ratio bucket (scaled to the resolution) closest to its own shape;
    off: square crops."""
    random_crop: bool = False
    """Crop a random part of the resized image (at multiples of 8 px) instead of its center."""
    flip: bool = False
    """Flip each image horizontally with probability 1/2 at every step."""
    cache_latents: bool = True
    """Encode every image and caption once before training (the VAE and text encoders then leave the device);
    off: encode each batch as it is drawn."""
    cache_dir: Path | None = None
    """Folder that keeps latents and prompt embeddings across runs, keyed by image content, caption, model
    weights and crop; None keeps them in memory only."""
    mixed_precision: MixedPrecision = "no"
    """Autocast dtype for the U-Net forward pass; the frozen U-Net and text encoders are stored in it too.
    Adapter weights, optimizer and VAE stay float32."""
    gradient_checkpointing: bool = False
    """Recompute U-Net activations in the backward pass: less memory, about a third more time per step."""
    compile: str | None = None
    """Compile the U-Net's training forward with torch.compile and this backend (`inductor`: fastest steps, but the
    first step waits for compilation, minutes on a CPU); None runs eagerly. Sampling and export stay eager."""
    device: str | None = None
    """Torch device; None means `cuda` when available, else `cpu`."""
    checkpoint_every: int | None = None
    """Save a resumable checkpoint every this many steps (always at the end); None means only at the end."""
    sample_prompts: tuple[str, ...] = ()
    """Prompts for the base-vs-adapted grid; empty means the first two training captions."""
    sample_seeds: tuple[int, ...] = (0,)
    """Seeds for the grid; each prompt is sampled once per seed, base and adapted from the same noise."""
    sample_steps: int = 20
    """Denoising steps per grid image."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale for the grid images."""

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        for name in ("output_dir", "resume", "cache_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        self.target_modules = tuple(self.target_modules)
        self.sample_prompts = tuple(self.sample_prompts)
        self.sample_seeds = tuple(int(s) for s in self.sample_seeds)
        for name in ("epochs", "batch_size", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "resolution", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        if self.mixed_precision not in typing.get_args(MixedPrecision):
            raise ValueError(f"mixed_precision must be one of {typing.get_args(MixedPrecision)}, got {self.mixed_precision!r}")
        if self.compile is not None and self.compile not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(f"compile must be a torch.compile backend {torch.compiler.list_backends()}, "
                             f"got {self.compile!r}")
        self.adapter_config()  # validates the adapter fields (method name, rank, ...) now, not mid-run

    def adapter_config(self) -> AdapterConfig:
        """Return the `opdiff.AdapterConfig` these settings describe."""
        return AdapterConfig(**{f.name: getattr(self, f.name) for f in fields(AdapterConfig)})

    def to_dict(self) -> dict:
        """Return the config as a JSON-serialisable dict (paths as strings, tuples as lists)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build a config from a dict (e.g. a parsed TOML/JSON file), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


def load_config_file(path: str | Path) -> dict:
    """Return the settings in a TOML or JSON file as a dict.

    A run's own `config.json` (written by `train`) works too: its `train` table is the TrainConfig.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError as e:  # tomllib arrived in Python 3.11
            raise ValueError(f"reading {path} needs Python >= 3.11 (tomllib); write the settings as JSON") from e
        d = tomllib.loads(text)
    elif path.suffix.lower() == ".json":
        d = json.loads(text)
    else:
        raise ValueError(f"config file {path} must end in .toml or .json")
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a table/object of settings")
    return d["train"] if isinstance(d.get("train"), dict) and "opdiff_version" in d else d


def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: the docstring written under it} for a dataclass (litgpt style)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _help_texts() -> dict[str, str]:
    return {**field_docs(AdapterConfig), **field_docs(TrainConfig)}


def _unwrap_optional(tp: object) -> object:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one `--flag` per TrainConfig field to `parser`, typed from the annotation, help from the field docstring.

    Flags default to "not given" (argparse.SUPPRESS) so that `config_from_args` can layer them over a config file.
    """
    hints = typing.get_type_hints(TrainConfig)
    helps = _help_texts()
    for f in fields(TrainConfig):
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = default if not isinstance(default, tuple) else " ".join(map(str, default)) or "(none)"
        kwargs: dict = {"default": argparse.SUPPRESS, "help": f"{helps[f.name]} [default: {shown}]"}
        if tp is bool:
            off = "--" + OFF_FLAGS.get(f.name, "no_" + f.name).replace("_", "-")
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true", **kwargs)
            parser.add_argument(off, dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=f"the opposite of --{f.name.replace('_', '-')}")
            continue
        if typing.get_origin(tp) is tuple:
            kwargs.update(nargs="*", type=typing.get_args(tp)[0], metavar=f.name.upper())
        elif typing.get_origin(tp) is Literal:
            kwargs.update(choices=typing.get_args(tp))
        elif f.name == "method":
            summaries = " ".join(f"{name}: {m.summary}" for name, m in METHODS.items())
            kwargs.update(choices=list(METHODS), metavar="METHOD", help=f"{kwargs['help']} {summaries}")
        else:
            kwargs.update(type=tp, metavar=f.name.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML or JSON file of settings (field names as keys, or a run's config.json); flags given here override it.",
    )


def config_from_args(args: argparse.Namespace, **overrides: object) -> TrainConfig:
    """Return the TrainConfig from defaults < resumed run's settings < `--config` file < `overrides` < flags.

    The resumed run's settings apply when `--resume RUN_DIR` is given (in a flag, the file or `overrides`).
    """
    values: dict = dict(load_config_file(args.config)) if args.config is not None else {}
    values.update(overrides)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values.update(given)
    if values.get("resume") is not None:
        return resume_config(values.pop("resume"), **values)
    return TrainConfig.from_dict(values)


def resume_config(run_dir: str | Path, **changes: object) -> TrainConfig:
    """Return the settings that continue the run in `run_dir`: its own, with `changes` on top and `resume` set.

    Pass e.g. `max_steps=` to train longer. `train` refuses changes outside RESUME_MAY_CHANGE by name, since
    they would make the loss curve differ from an uninterrupted run's.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / RUN_CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"cannot resume {run_dir}: it has no {RUN_CONFIG_FILE} (not a run folder)")
    values = {**load_config_file(config_file), "output_dir": run_dir, **changes, "resume": run_dir}
    return TrainConfig.from_dict(values)
