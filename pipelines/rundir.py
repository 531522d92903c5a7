"""A run folder and the files in it: the one place that knows their names and how to read and write them.

    runs/op-lora-20261201-120000/
      config.json                    resolved settings, adapter, base, dataset hash (written at start)
      losses.csv                     step, loss (rewritten with every checkpoint)
      checkpoint.pt                  everything `--resume` needs
      adapter_training.safetensors   the uncollapsed trainable state (what `opdiff export` rebuilds from)
      events.json                    what the method did while training (e.g. matrices given MPO cores)
      lora.safetensors, lora_kohya.safetensors   the collapsed LoRA (written at the end)
      samples.png                    base vs adapted grid
      samples/step-000100.png        sample grids rendered while training (`sample_every`; step 0 is the base),
                                     shown by the GUI as they arrive
      tensorboard/                   TensorBoard event files (loss, smoothed loss, lr, samples)
      cmmd.json, eval/               `opdiff eval`'s latest score and images
      scores.json                    every score kept, one per CLIP model, image count and steps
      error.txt                      why the run failed, when it did
      dataset/                       a zip dataset, extracted

Every write goes through a temporary file and a rename, so a crash never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and a rename; return `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return `path`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class RunDir:
    """The files of one run folder. `RunDir(path).losses` is the loss curve's path, `.read_losses()` its rows."""

    CONFIG = "config.json"
    LOSSES = "losses.csv"
    CHECKPOINT = "checkpoint.pt"
    TRAINING = "adapter_training.safetensors"
    EVENTS = "events.json"
    LEGACY_EVENTS = "selection.json"  # the name runs of opdiff 0.1 gave the file
    LORA = "lora.safetensors"
    CMMD = "cmmd.json"
    GRID = "samples.png"
    SAMPLES = "samples"
    EVAL = "eval"
    SCORES = "scores.json"
    ERROR = "error.txt"
    DATASET = "dataset"
    TENSORBOARD = "tensorboard"
    IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
    SCORE_KEY = ("clip_model", "n_images", "steps", "seed", "guidance_scale")
    """What makes two scores of a run comparable: a new score with the same values replaces the old one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        """The folder's name: how the GUI and the API refer to a run."""
        return self.path.name

    config = property(lambda self: self.path / self.CONFIG)
    losses = property(lambda self: self.path / self.LOSSES)
    checkpoint = property(lambda self: self.path / self.CHECKPOINT)
    training_state = property(lambda self: self.path / self.TRAINING)
    events = property(lambda self: self.path / self.EVENTS)
    lora = property(lambda self: self.path / self.LORA)
    cmmd = property(lambda self: self.path / self.CMMD)
    grid = property(lambda self: self.path / self.GRID)
    samples_dir = property(lambda self: self.path / self.SAMPLES)
    scores = property(lambda self: self.path / self.SCORES)
    error = property(lambda self: self.path / self.ERROR)
    eval_dir = property(lambda self: self.path / self.EVAL)
    dataset_dir = property(lambda self: self.path / self.DATASET)
    tensorboard_dir = property(lambda self: self.path / self.TENSORBOARD)

    def sample_grid(self, step: int) -> Path:
        """The grid of the samples rendered after optimizer step `step` (0: before training, the base)."""
        return self.samples_dir / f"step-{step:06d}.png"

    def sample_grids(self) -> list[tuple[int, Path]]:
        """(step, grid) of every sample grid rendered while training, by step."""
        grids = [(int(p.stem.removeprefix("step-")), p) for p in self.samples_dir.glob("step-*.png")
                 if p.stem.removeprefix("step-").isdigit()]
        return sorted(grids)

    def is_run(self) -> bool:
        """True when the folder holds a run's config.json."""
        return self.config.is_file()

    # -- config.json

    def read_config(self) -> dict:
        """Return config.json; ValueError naming the file when it is missing or not valid JSON."""
        if not self.config.is_file():
            raise ValueError(f"{self.path} is not a run folder: it has no {self.CONFIG}")
        try:
            return json.loads(self.config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.config} is damaged ({e}); restore it or start a new run") from None

    def write_config(self, config: dict) -> None:
        """Write config.json atomically."""
        atomic_write_text(self.config, json.dumps(config, indent=2))

    # -- losses.csv

    def read_losses(self) -> list[tuple[int, float]]:
        """Return (step, loss) rows; empty when there is no losses.csv yet."""
        if not self.losses.is_file():
            return []
        with self.losses.open(newline="") as f:
            return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]

    def write_losses(self, losses: list[float]) -> None:
        """Write one row per optimizer step (1-based), atomically."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["step", "loss"])
        writer.writerows((i, f"{loss:.6f}") for i, loss in enumerate(losses, start=1))
        atomic_write_text(self.losses, out.getvalue())

    def steps_done(self) -> int | None:
        """Optimizer steps recorded in losses.csv (that of the last checkpoint), or None without the file."""
        return len(self.read_losses()) if self.losses.is_file() else None

    # -- events.json (what the method did: e.g. LoRA-Over's selections)

    def read_events(self) -> list[dict]:
        """Return the method's events; empty when it had none."""
        for path in (self.events, self.path / self.LEGACY_EVENTS):
            if path.is_file():
                return json.loads(path.read_text(encoding="utf-8"))
        return []

    def write_events(self, events: list[dict]) -> None:
        """Write the method's events atomically (nothing when there are none)."""
        if events:
            atomic_write_text(self.events, json.dumps(events, indent=2))

    # -- cmmd.json

    def read_cmmd(self) -> dict | None:
        """Return the `opdiff eval` result, or None when the run has not been evaluated."""
        return json.loads(self.cmmd.read_text(encoding="utf-8")) if self.cmmd.is_file() else None

    def write_cmmd(self, result: dict) -> None:
        """Write the `opdiff eval` result atomically."""
        atomic_write_text(self.cmmd, json.dumps(result, indent=2))

    # -- scores.json (every evaluation kept, keyed by SCORE_KEY)

    def read_scores(self) -> list[dict]:
        """Return every kept score, oldest first; a run evaluated before scores were kept gives its cmmd.json."""
        if self.scores.is_file():
            return json.loads(self.scores.read_text(encoding="utf-8"))
        latest = self.read_cmmd()
        return [latest] if latest is not None else []

    def add_score(self, result: dict) -> bool:
        """Keep `result` in scores.json, replacing a score with the same SCORE_KEY; return whether it replaced
        one."""
        key = tuple(result.get(k) for k in self.SCORE_KEY)
        kept = [r for r in self.read_scores() if tuple(r.get(k) for k in self.SCORE_KEY) != key]
        replaced = len(kept) < len(self.read_scores())
        atomic_write_text(self.scores, json.dumps([*kept, result], indent=2))
        return replaced

    # -- samples/ (written while training)

    def list_samples(self) -> list[Path]:
        """Return the images in samples/, in name order (step order for `step-XXXXXX` names); empty without any."""
        if not self.samples_dir.is_dir():
            return []
        return sorted(p for p in self.samples_dir.iterdir()
                      if p.is_file() and p.suffix.lower() in self.IMAGE_SUFFIXES)

    # -- error.txt

    def read_error(self) -> str | None:
        """Return why the run failed, or None when it has not failed."""
        return self.error.read_text(encoding="utf-8") if self.error.is_file() else None

    def write_error(self, message: str) -> None:
        """Record why the run failed (listed with the run until it is resumed)."""
        atomic_write_text(self.error, message)
