"""A run folder and the files in it: the one place that knows their names and how to read and write them.

    runs/op-lora-20261201-120000/
      config.json                    resolved settings, adapter, base, dataset hash (written at start)
      losses.csv                     step, loss (rewritten with every checkpoint)
      checkpoint.pt                  everything `--resume` needs (the newest checkpoint)
      checkpoint-step<N>.pt          older checkpoints kept beside it (`keep_checkpoints`)
      adapter_training.safetensors   the uncollapsed trainable state (what `opdiff export` rebuilds from)
      events.json                    what the method did while training (e.g. matrices given MPO cores)
      lora.safetensors, lora_kohya.safetensors   the collapsed LoRA (written when every planned step is done)
      lora-partial-step<N>.safetensors, ...      the LoRA of a run stopped after N of its planned steps
      samples.png                    base vs adapted grid
      samples/step-000100.png        sample grids rendered while training (`sample_every`; step 0 is the base),
                                     shown by the GUI as they arrive
      tensorboard/                   TensorBoard event files (loss, smoothed loss, lr, samples)
      cmmd.json, eval/               `opdiff eval`'s latest score and images
      scores.json                    every score kept, one per CLIP model, image count and steps
      error.txt                      why the run failed, when it did
      dataset/                       a zip dataset, extracted
      .opdiff-lock                   present while a process trains here (keeps a second one out)

    runs/op-lora-20261201-120000.replaced-20261202-090000/   an earlier run moved aside by `--overwrite`

Every write goes through a temporary file and a rename, so a crash never leaves half a file.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXTRACTED_MARKER = ".opdiff-extracted"
"""The file `pipelines.data` leaves in a folder it extracted a zip dataset into (its archive's hash)."""


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and a rename; return `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:  # also when interrupted: no temporary file is left behind
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return `path`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(folder: Path | None, setting: str) -> None:
    """Raise ValueError naming `setting` when files cannot be created in `folder` (made when missing); None: no-op."""
    if folder is None:
        return
    probe = Path(folder) / f".opdiff-write-test.{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{setting} {folder} cannot be written ({e.strerror or e}); choose another folder or make "
                         "it writable") from None


class RunFolderBusy(ValueError):
    """Raised when another process holds the run folder's lock."""


class RunDir:
    """The files of one run folder. `RunDir(path).losses` is the loss curve's path, `.read_losses()` its rows."""

    CONFIG = "config.json"
    LOSSES = "losses.csv"
    CHECKPOINT = "checkpoint.pt"
    OLDER_CHECKPOINT = "checkpoint-step{step}.pt"
    PARTIAL = "-partial-step{step}"
    """Added to the LoRA file names of a run stopped after `step` steps: `lora-partial-step84.safetensors`."""
    LOCK = ".opdiff-lock"
    REPLACED = "{name}.replaced-{time}"
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

    # -- starting a run here

    def contents(self) -> list[Path]:
        """What the folder holds besides its lock and an extracted dataset (both remade by a new run)."""
        if not self.path.is_dir():
            return []
        own = {self.LOCK} | ({self.DATASET} if (self.dataset_dir / EXTRACTED_MARKER).is_file() else set())
        return sorted(p for p in self.path.iterdir() if p.name not in own)

    def prepare_new(self, overwrite: bool = False) -> Path | None:
        """Check that a new run may start in this folder; return where an earlier run was moved, if anywhere.

        The folder must not exist or must be empty (`contents`). With `overwrite`, whatever it holds is first moved
        aside to a sibling folder (`REPLACED`), never deleted. Raises ValueError naming the folder and the ways on.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run folder {self.path} is a file, not a folder; choose another --output-dir")
        held = self.contents()
        if not held:
            return None
        if overwrite:
            return self.move_aside()
        what = "a run" if self.is_run() else f"{len(held)} file(s), e.g. {held[0].name}"
        ways = [f"--resume {self.path} to continue it"] if self.checkpoint.is_file() else []
        ways += ["another --output-dir", "--overwrite to move what is there aside (nothing is deleted)"]
        raise ValueError(f"run folder {self.path} already holds {what}; a new run never overwrites it. "
                         f"Use {', or '.join(ways)}")

    def move_aside(self) -> Path:
        """Rename the folder to `<name>.replaced-<time>` beside it and return the new path."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(self.REPLACED.format(name=self.path.name, time=stamp))
        for k in range(2, 1000):
            if not aside.exists():
                break
            aside = self.path.with_name(self.REPLACED.format(name=self.path.name, time=f"{stamp}-{k}"))
        os.rename(self.path, aside)
        log.warning("moved the earlier contents of %s to %s", self.path, aside)
        return aside

    @contextmanager
    def claim(self, new_run: bool, overwrite: bool = False) -> Iterator[None]:
        """Hold the folder for one training process while the block runs: locked, and for a new run empty first.

        A new run checks the folder with `prepare_new` (which moves an earlier run aside with `overwrite`); a resumed
        one needs the folder to exist. A folder created here and left without a run (the block failed before
        writing config.json) is removed again. Raises ValueError naming the folder when it cannot be used.
        """
        if not new_run and not self.path.is_dir():
            raise ValueError(f"cannot resume {self.path}: no such folder")
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run folder {self.path} is a file, not a folder; choose another --output-dir")
        created = not self.path.exists()
        try:
            with self.lock():
                moved = self.prepare_new(overwrite) if new_run else None
                if moved is None:
                    yield
                    return
                (moved / self.LOCK).unlink(missing_ok=True)  # the lock moved with the folder; this process holds it
            with self.lock():
                yield
        except BaseException:
            if created and self.path.is_dir() and not self.is_run():
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock file while the block runs, so that a second process cannot train here too.

        The lock is an OS file lock (flock): it ends with its process, so a lock file left by a process that was
        killed is recognised as stale and taken over. It is held on a read-only descriptor, so that the folder's
        file system can still be remounted read-only under a run. Raises RunFolderBusy naming the holder.
        """
        path = self.path / self.LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"cannot use run folder {self.path}: {e.strerror or e}; choose another --output-dir or "
                             "make it writable") from None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise RunFolderBusy(f"run folder {self.path} is in use by {holder}; wait for it to end, or use "
                                    "another --output-dir") from None
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        stale = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if stale:
            log.warning("taking over the lock of %s in %s: that process has ended", stale, self.path)
        path.write_text(f"process {os.getpid()} on {socket.gethostname()}", encoding="utf-8")  # who holds it
        try:
            yield
        finally:
            try:
                path.unlink(missing_ok=True)  # while still locked: a waiting process then retries on a new file
            except OSError:  # a folder turned read-only: the file stays, and the next run sees the lock is stale
                pass
            os.close(fd)

    # -- checkpoints and exports

    def older_checkpoint(self, step: int) -> Path:
        """Where the checkpoint of `step` is kept once a newer one is checkpoint.pt."""
        return self.path / self.OLDER_CHECKPOINT.format(step=step)

    def older_checkpoints(self) -> list[tuple[int, Path]]:
        """The kept older checkpoints as (step, file), newest first."""
        head, tail = self.OLDER_CHECKPOINT.split("{step}")
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
        found = [(int(m[1]), p) for p in self.path.glob(f"{head}*{tail}") if (m := pattern.fullmatch(p.name))]
        return sorted(found, reverse=True)

    def lora_for(self, steps: int | None, planned: int | None) -> Path:
        """The LoRA file for the adapter after `steps` of `planned` steps: `lora.safetensors` when every planned
        step is done (or either is unknown), else `lora-partial-step<steps>.safetensors`, so that a stopped run never
        looks finished (other formats add their suffix to either)."""
        if steps is None or planned is None or steps >= planned:
            return self.lora
        return self.lora.with_stem(self.lora.stem + self.PARTIAL.format(step=steps))

    def current_lora(self) -> Path:
        """The LoRA file of the run as it stands: `lora_for` the steps in losses.csv and the planned ones (it exists
        once the run has exported at that step)."""
        return self.lora_for(self.steps_done(), self.planned_steps())

    def partial_tag(self) -> str:
        """"-partial-step<N>" for a run that stopped after N of its planned steps, "" otherwise: for file names."""
        return self.current_lora().stem.removeprefix(self.lora.stem)

    def planned_steps(self) -> int | None:
        """The steps the run was planned to take (config.json's schedule), or None when it does not say."""
        if not self.config.is_file():
            return None
        return self.read_config().get("schedule", {}).get("total_steps")

    # -- config.json

    def read_config(self) -> dict:
        """Return config.json; ValueError naming the file when it is missing or not valid JSON."""
        if not self.config.is_file():
            raise ValueError(f"{self.path} is not a run folder: it has no {self.CONFIG}")
        return _read_json(self.config, "restore it or start a new run")

    def write_config(self, config: dict) -> None:
        """Write config.json atomically."""
        atomic_write_text(self.config, json.dumps(config, indent=2))

    # -- losses.csv

    def read_losses(self) -> list[tuple[int, float]]:
        """Return (step, loss) rows; empty when there is no losses.csv yet."""
        if not self.losses.is_file():
            return []
        try:
            with self.losses.open(newline="") as f:
                return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.losses} is damaged ({type(e).__name__}: {e}); `opdiff train --resume "
                             f"{self.path}` writes it again from checkpoint.pt") from None

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
                return _read_json(path, f"`opdiff train --resume {self.path}` writes it again from checkpoint.pt")
        return []

    def write_events(self, events: list[dict]) -> None:
        """Write the method's events atomically (nothing when there are none)."""
        if events:
            atomic_write_text(self.events, json.dumps(events, indent=2))

    # -- cmmd.json

    def read_cmmd(self) -> dict | None:
        """Return the `opdiff eval` result, or None when the run has not been evaluated."""
        if not self.cmmd.is_file():
            return None
        return _read_json(self.cmmd, f"delete it, or score the run again with `opdiff eval {self.path}`")

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


def _read_json(path: Path, fix: str) -> Any:
    """Return the JSON in `path`; ValueError naming the file and `fix` (what to do) when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); {fix}") from None
