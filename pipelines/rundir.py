"""A run folder and the files in it: the one place that knows their names and how to read and write them.

    runs/op-lora-20261201-120000/
      config.json                    resolved settings, adapter, base, dataset hash (written at start)
      losses.csv                     step, loss (rewritten with every checkpoint)
      checkpoint.pt                  everything `--resume` needs
      adapter_training.safetensors   the uncollapsed trainable state (what `opdiff export` rebuilds from)
      events.json                    what the method did while training (e.g. matrices given MPO cores)
      lora.safetensors, lora_kohya.safetensors   the collapsed LoRA (written at the end)
      samples.png                    base vs adapted grid
      samples/step-000100.png        samples while training (`sample_every`): step 0 is the base
      tensorboard/                   TensorBoard event files (loss, smoothed loss, lr, samples)
      cmmd.json, eval/               `opdiff eval`'s score and images
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
    EVAL = "eval"
    DATASET = "dataset"
    SAMPLES = "samples"
    TENSORBOARD = "tensorboard"

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
    eval_dir = property(lambda self: self.path / self.EVAL)
    dataset_dir = property(lambda self: self.path / self.DATASET)
    samples_dir = property(lambda self: self.path / self.SAMPLES)
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
