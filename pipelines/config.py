"""The training configuration, and the command line and config files built from the settings' one description.

`TrainConfig` nests `opdiff.AdapterConfig`; users see both flat (`--op-width 32`, `op_width = 32` in a file),
and `add_settings` / `settings_from_args` turn any `opdiff.settings.Settings` dataclass into argparse flags, so
`train`, `sample`, `export`, `eval`, `cmmd` and `reproduce` are all built the same way.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from opdiff import AdapterConfig
from opdiff.settings import Setting, Settings, option
from pipelines import presets
from pipelines.rundir import RunDir

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO_ROOT / "assets" / "tiny-sdxl"
BUNDLED_DATA = REPO_ROOT / "assets" / "demo-data"

MixedPrecision = Literal["no", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw8bit", "prodigy"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
LogWith = Literal["auto", "tensorboard", "none"]
# Resuming: a run continues with its own settings, and may change only those that leave the model and what it learns
# from alone. Everything else (the base, VAE, adapter, dataset content, captions, crops, resolution, batch, seed,
# precision) is refused by name: the result would be neither the run that was started nor a new one.
OPTIMIZATION_SETTINGS = frozenset({
    "lr", "weight_decay", "max_steps", "epochs", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power",
    "max_grad_norm", "mpo_lr", "mpo_lr_power", "mpo_lr_cap",
})
"""Settings that change only the optimization path of the steps to come: a resumed run may change them, and the
change is logged and recorded in its config.json (`resumed`). A new optimizer or schedule setting belongs here."""
RESUME_MAY_CHANGE = OPTIMIZATION_SETTINGS | frozenset({
    # bookkeeping, where data and caches live, how memory and time are spent: never the numbers
    "data", "output_dir", "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "device", "cache_dir",
    "cache_latents", "gradient_checkpointing", "compile", "sample_prompts", "sample_seeds", "sample_steps",
    "guidance_scale", "sample_every", "log_with", "preset",
})
MIN_RESOLUTION = 32
"""The smallest training size in pixels: SDXL's VAE divides by 8 and its U-Net halves the latent twice (three
resolution levels), so 32 px is the smallest image whose deepest U-Net features are still 1 x 1; below it the
down-sampling has nothing left to halve. `pipelines.encoding.min_resolution` computes it for a loaded U-Net."""


def _check_compile(value: str | None) -> None:
    if value is not None and value not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(f"compile must be a torch.compile backend {torch.compiler.list_backends()}, got {value!r}")


@dataclass(init=False)
class TrainConfig(Settings):
    """Everything a training run needs. Defaults train a LoRA on the bundled tiny model and demo images.

    Adapter settings may be given flat, as on the command line: `TrainConfig(method="op-lora", rank=8, lr=1e-4)`
    is `TrainConfig(adapter=AdapterConfig(method="op-lora", rank=8), lr=1e-4)`.
    """

    base: str = option(str(BUNDLED_MODEL), "Base model: a diffusers folder, a single-file .safetensors SDXL "
                       "checkpoint, or a Hugging Face hub id.", group="run", label="base model")
    data: Path = option(BUNDLED_DATA, "Dataset: a folder of images with same-name .txt captions or a "
                        "metadata.jsonl, or a .zip of either.", group="run", label="dataset")
    output_dir: Path | None = option(None, "Run folder for settings, losses, checkpoints and the exported LoRA.",
                                     group="run", none_means="runs/<method>-<date-time>", label="run folder")
    resume: Path | None = option(None, "Continue the run in this folder from its last checkpoint, with its "
                                 "settings (flags may change lr, weight_decay, max_steps, epochs and bookkeeping).",
                                 group="run", cli=True, none_means="start a new run", label="resume run")
    overwrite: bool = option(False, "Start a new run in a run folder that is not empty by first moving what it "
                             "holds aside, to <folder>.replaced-<date-time> (nothing is deleted).", group="run",
                             off_flag="--no-overwrite", label="overwrite")
    preset: str | None = option(None, "Start from settings shipped with opdiff for a purpose or a GPU size; "
                                "settings given besides it override it.", group="run", choices=presets.names(),
                                choice_help=tuple(presets.load(n).description for n in presets.names()),
                                none_means="opdiff's defaults")
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The adapter: method, rank, alpha, targets and the method's own settings (flat for users)."""

    lr: float = option(1e-4, "Learning rate. Lower it if the loss jumps or turns NaN; raise it if nothing changes.",
                       group="basic", ref="AdamW, constant; op-lora.txt Sec. 4.1", label="learning rate", above=0,
                       reason="0 trains nothing and a negative rate climbs the loss")
    epochs: int = option(2, "How many times training goes through all the images.", group="basic",
                         ref="op-lora.txt Sec. 4.1: two epochs",
                         minimum=1)
    max_steps: int | None = option(None, "Stop after this many training steps.", group="basic", minimum=1,
                                   none_means="epochs full passes over the dataset", label="max steps")
    batch_size: int = option(1, "Images per training step (per GPU).", group="basic", minimum=1,
                             label="batch size")
    resolution: int | None = option(None, "Training image size in pixels (a multiple of 8, at least 32).",
                                    group="basic", minimum=MIN_RESOLUTION, reason="SDXL's VAE divides by 8 and its U-Net halves "
                                    "the latent twice more: below 32 px nothing is left to halve",
                                    none_means="the base model's native size (1024 for SDXL)")
    seed: int = option(0, "Random seed: the same seed gives the same run.", group="basic")
    optimizer: Optimizer = option("adamw", "How the adapter's weights are updated.", group="basic",
                                  choice_help=("AdamW (the papers' optimizer).",
                                               "AdamW with 8-bit state: less memory (needs opdiff[bnb8bit]).",
                                               "Prodigy: finds its own step size; set lr to 1.0 (needs "
                                               "opdiff[prodigy])."), ref="op-lora.txt Sec. 4.1: AdamW")
    lr_scheduler: LRScheduler = option("constant", "How the learning rate changes over the run (diffusers' "
                                       "get_scheduler).", group="optimization", label="learning-rate schedule",
                                       choice_help=("the same rate throughout (the papers').",
                                                    "rises from 0 over the warm-up steps, then stays.",
                                                    "warm-up, then falls in a straight line to 0 at the end.",
                                                    "warm-up, then falls along a half cosine to 0 at the end.",
                                                    "warm-up, then lr_num_cycles cosine falls, each from the "
                                                    "full rate.",
                                                    "warm-up, then falls as (1 - progress)^lr_power to 0."))
    lr_warmup_steps: int = option(0, "Steps over which the learning rate rises from 0 to its full value at the "
                                  "start (not with the constant schedule).", group="optimization", minimum=0,
                                  label="warm-up steps")
    lr_num_cycles: int = option(1, "Cosine-with-restarts schedule: how many cosine falls (restarts) in the run.",
                                group="optimization", minimum=1, label="schedule cycles")
    lr_power: float = option(1.0, "Polynomial schedule: the power of its fall (1 is linear).", group="optimization",
                             above=0, label="schedule power")
    gradient_accumulation_steps: int = option(1, "Add up the gradients of this many batches before each "
                                              "optimizer step: trains like a batch this many times larger in the "
                                              "memory of one batch.", group="optimization", minimum=1,
                                              label="gradient accumulation")
    max_grad_norm: float | None = option(None, "Scale the gradient down whenever its norm exceeds this (kohya "
                                         "and the diffusers scripts use 1.0).", group="optimization", above=0,
                                         none_means="no clipping, as in the papers", label="gradient clipping")
    snr_gamma: float | None = option(None, "Min-SNR weighting: weigh each timestep's loss by min(SNR, gamma) / "
                                     "SNR, so easy low-noise steps count less; 5 is the usual value.",
                                     group="optimization", above=0, none_means="every timestep weighs the same",
                                     ref="Hang et al. 2023, Min-SNR; diffusers --snr_gamma", label="min-SNR gamma")
    noise_offset: float = option(0.0, "Add this much per-channel constant to the training noise, so the model "
                                 "learns very dark and very bright images; 0.0357 to 0.1 is usual.", group="optimization",
                                 minimum=0, label="noise offset")
    weight_decay: float = option(1e-2, "Pulls the adapter's weights slightly toward zero at every step, against "
                                 "overfitting a small dataset; rarely needs changing.", group="optimization", label="weight decay",
                                 ref="the optimizer's decoupled weight decay", minimum=0)

    caption: str | None = option(None, "Caption for images that have none.", group="data",
                                 none_means="images without a caption are skipped", label="default caption")
    buckets: bool = option(True, "Train each image at the aspect ratio (scaled to the resolution) closest to "
                           "its own; off: square crops.", group="data", label="aspect-ratio buckets")
    random_crop: bool = option(False, "Crop a random part of each resized image instead of its center.",
                               group="data", off_flag="--center-crop", label="random crop")
    flip: bool = option(False, "Mirror each image left-right at random.", group="data", label="random flip")
    trigger_word: str | None = option(None, "A word put at the start of every training caption (and of the "
                                      "default sample prompts): the word that calls up what was learnt.",
                                      group="data", none_means="captions as written", label="trigger word")
    caption_dropout_rate: float = option(0.0, "Share of training captions replaced by an empty one, so the adapter "
                                         "also learns the unprompted look (0.05 to 0.1 is usual).", group="data",
                                         minimum=0, maximum=1, label="caption dropout")
    shuffle_caption: bool = option(False, "Shuffle the comma-separated tags of each caption every time it is "
                                   "drawn (for tag captions).", group="data", label="shuffle tags")
    keep_tokens: int = option(0, "With shuffled tags: keep this many leading tags in place.", group="data",
                              minimum=0, label="keep first tags")

    sample_prompts: tuple[str, ...] = option((), "Prompts for the base-vs-adapted images; empty: the first two "
                                             "training captions.", group="sampling", label="sample prompts")
    sample_seeds: tuple[int, ...] = option((0,), "Seeds for the sample images; each prompt once per seed.",
                                           group="sampling", label="sample seeds")
    sample_steps: int = option(20, "Denoising steps per sample image.", group="sampling", minimum=1,
                               label="sample steps")
    guidance_scale: float = option(5.0, "Classifier-free guidance of the sample images.", group="sampling",
                                   minimum=0, label="guidance scale")
    sample_every: int | None = option(None, "While training, render the sample prompts and seeds every this many "
                                      "steps (and before the first and after the last) into samples/ in the run "
                                      "folder.", group="sampling", minimum=1, none_means="no samples while "
                                      "training", label="sample every")

    vae: str | None = option(None, "A VAE to use instead of the base model's (folder, file or hub id); it runs in "
                             "float32.", none_means="the base model's", label="VAE")
    cache_latents: bool = option(True, "Encode every image and caption once before training (the encoders then "
                                 "leave the GPU); off: encode each batch as it is drawn.", label="cache latents")
    cache_dir: Path | None = option(None, "Folder that keeps image latents and caption embeddings for later runs.",
                                    none_means="keep them in memory only", label="cache folder")
    mixed_precision: MixedPrecision = option("no", "Run the U-Net in 16-bit (bf16 on recent GPUs, fp16 on older "
                                             "ones) to save memory and time; the adapter stays float32.",
                                             label="mixed precision")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass: less memory, about a "
                                          "third more time per step.", label="gradient checkpointing")
    compile: str | None = option(None, "Compile the U-Net's training step with torch.compile and this backend "
                                 "(inductor is fastest; the first step waits minutes for the compiler).",
                                 none_means="no compilation", label="compile backend")
    device: str | None = option(None, "Which GPU (or the CPU) trains, e.g. cuda:1 for the second GPU.",
                                none_means="the first GPU when there is one, else the CPU")
    log_with: LogWith = option("auto", "Where the loss, learning rate and samples are logged besides losses.csv.",
                               choice_help=("TensorBoard when it is installed (opdiff[tensorboard]).",
                                            "TensorBoard event files in tensorboard/ of the run folder.",
                                            "losses.csv only."), label="log with")
    checkpoint_every: int | None = option(None, "Save a resumable checkpoint every this many steps (always at the "
                                          "end).", minimum=1, none_means="only at the end", label="checkpoint every")
    keep_checkpoints: int = option(2, "How many of the newest checkpoints to keep: checkpoint.pt and the ones "
                                   "before it as checkpoint-step<N>.pt, for a run that went wrong after its last "
                                   "save.", minimum=1, label="keep checkpoints")

    def __init__(self, adapter: AdapterConfig | None = None, **values: Any) -> None:
        if adapter is None and values.get("preset") is not None:  # from code: the preset under the values given
            values = {**presets.settings(values["preset"]), **values}
        adapter_names = {s.name for s in AdapterConfig.settings()}
        flat = {k: values.pop(k) for k in list(values) if k in adapter_names}
        if adapter is None:
            adapter = AdapterConfig.from_dict(flat)
        elif flat:
            adapter = adapter.replace(**flat)
        self.adapter = adapter
        for f in fields(self):
            if f.name != "adapter":
                setattr(self, f.name, values.pop(f.name) if f.name in values else _field_default(f))
        if values:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(values))}")
        self.__post_init__()

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "") -> TrainConfig:
        """Build the config from flat settings (see `Settings.from_dict`), over the named `preset`'s settings."""
        if values.get("preset") is not None:
            values = {**presets.settings(str(values["preset"])), **values}
        return super().from_dict(values, source=source)

    def __post_init__(self) -> None:
        for s in self.settings():
            if s.name in self.__dict__ and s.name != "adapter":
                value = getattr(self, s.name)
                setattr(self, s.name, s.convert(value) if value is not None or not s.optional else None)
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        _check_compile(self.compile)
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError("lr_warmup_steps needs a schedule with a warm-up; the constant schedule has none: use "
                             "--lr-scheduler constant_with_warmup (or another)")

    @property
    def method(self) -> str:
        """The adapter method's name (`adapter.method`)."""
        return self.adapter.method


def _field_default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def load_config_file(path: str | Path) -> dict:
    """Return the flat settings in a TOML or JSON file.

    A run's own `config.json` (written by `train`) works too: its `train` table holds the settings.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            d = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            d = json.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .toml or .json")
    except (json.JSONDecodeError, ValueError) as e:
        if "must end in" in str(e):
            raise
        raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a table/object of settings")
    return d["train"] if isinstance(d.get("train"), dict) and "opdiff_version" in d else d


# ----------------------------------------------------------------------------------------------------------
# Settings -> argparse


def add_settings(parser: argparse.ArgumentParser, settings: list[Setting]) -> None:
    """Add one argument per setting: `--flag` (or positional), typed, with the setting's help.

    Flags default to "not given" (argparse.SUPPRESS) so that `given` can layer them over defaults and files; a
    boolean gets `--name` and its opposite. `--help` lists them under their group's title.
    """
    sections: dict[str, argparse._ArgumentGroup] = {}
    for s in settings:
        if not s.cli:
            continue
        if s.positional:
            section = parser
        else:
            if s.group not in sections:
                sections[s.group] = parser.add_argument_group(GROUP_TITLES[s.group])
            section = sections[s.group]
        help_text = s.full_help().replace("%", "%%")
        if s.allowed is not None and s.choice_help:
            help_text += " " + " ".join(f"{c}: {h}" for c, h in zip(s.allowed, s.choice_help, strict=True))
        if s.read_by is not None:
            help_text += f" [read by {', '.join(s.read_by)}]"
        if s.positional:
            section.add_argument(s.name, type=_parser(s), help=help_text, metavar=s.name.upper())
            continue
        shown = " ".join(map(str, s.default)) if isinstance(s.default, tuple) else s.default
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": s.name,
                                  "help": f"{help_text} [default: {shown if shown not in ('', None) else '(none)'}]"}
        if s.required:
            kwargs.update(required=True, help=help_text)
        if s.base_type is bool:
            section.add_argument(s.flag, action="store_true", **kwargs)
            section.add_argument(s.off_flag or "--no-" + s.name.replace("_", "-"), dest=s.name, action="store_false",
                                default=argparse.SUPPRESS, help=f"the opposite of {s.flag}")
        elif s.is_list:
            section.add_argument(s.flag, nargs="*", type=_parser(s), metavar=s.name.upper(), **kwargs)
        elif s.allowed is not None:
            many = len(s.allowed) > 4  # a long list goes into the help, not the usage line
            section.add_argument(s.flag, choices=s.allowed, metavar=s.name.upper() if many else None, **kwargs)
        else:
            section.add_argument(s.flag, type=_parser(s), metavar=s.name.upper(), **kwargs)


GROUP_TITLES = {"run": "what to train on and where", "basic": "main settings",
                "optimization": "schedule, accumulation, clipping and loss",
                "method": "settings of some methods (each says which)", "data": "captions and images",
                "sampling": "sample images", "advanced": "memory, speed and devices"}


def _parser(s: Setting):
    """argparse `type=`: one value converted and range-checked by the setting (a message naming it otherwise)."""
    def parse(text: str) -> Any:
        try:
            return Setting(s.name, s.item_type, None, "", minimum=s.minimum, above=s.above,
                           maximum=s.maximum, reason=s.reason).convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = s.item_type.__name__ if isinstance(s.item_type, type) else "value"
    return parse


def given(args: argparse.Namespace, settings: list[Setting]) -> dict[str, Any]:
    """The settings given on the command line, by name."""
    return {s.name: getattr(args, s.name) for s in settings if hasattr(args, s.name)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every TrainConfig setting as a flag, and `--config FILE`."""
    add_settings(parser, TrainConfig.settings())
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="TOML or JSON file of settings (the flag names with underscores as keys, or a run's "
                        "config.json); flags given here override it.")


def config_from_args(args: argparse.Namespace, **overrides: object) -> TrainConfig:
    """Return the TrainConfig from defaults < resumed run's settings < `--config` file < `overrides` < flags."""
    values: dict = dict(load_config_file(args.config)) if getattr(args, "config", None) is not None else {}
    values.update(overrides)
    values.update(given(args, TrainConfig.settings()))
    if values.get("resume") is not None:
        return resume_config(values.pop("resume"), **values)
    return TrainConfig.from_dict(values, source=str(args.config) if getattr(args, "config", None) else "")


def resume_config(run_dir: str | Path, **changes: object) -> TrainConfig:
    """Return the settings that continue the run in `run_dir`: its own, with `changes` on top and `resume` set.

    Pass e.g. `max_steps=` to train longer. `train` refuses changes outside RESUME_MAY_CHANGE by name, since
    they would make the loss curve differ from an uninterrupted run's.
    """
    run = RunDir(run_dir)
    if not run.is_run():
        raise ValueError(f"cannot resume {run.path}: it has no {RunDir.CONFIG} (not a run folder)")
    values = {**saved_settings(load_config_file(run.config)), "output_dir": run.path, **changes, "resume": run.path}
    return TrainConfig.from_dict(values, source=str(run.config))


def saved_settings(values: dict) -> dict:
    """A run's saved settings with what it meant by a setting newer than it: the setting's `absent` value."""
    absent = {s.name: s.absent for s in TrainConfig.settings() if s.absent is not None and s.name not in values}
    return {**absent, **values}
