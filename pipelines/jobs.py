"""Everything the GUI needs that is not a widget: one background training job, the runs in an output folder,
named datasets built from uploads, presets, comparisons and the notes that go with exported files.

State lives here, in the server process, not in a browser session: closing or reloading the page neither stops a
run nor loses its progress, and the page finds everything again by polling `TrainingJobs.status()` and listing
the output folder.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath

import opdiff
from metrics import ClipEmbedder
from pipelines import presets
from pipelines.config import TrainConfig
from pipelines.data import CAPTION_EXTENSION, IMAGE_EXTENSIONS, METADATA_FILE, scan_dataset
from pipelines.evaluate import ClipOptions, load_embedder
from pipelines.export import purpose
from pipelines.rundir import RunDir
from pipelines.sample import DEFAULT_PROMPTS, Comparison, SampleConfig, sample, save_grid
from pipelines.train import train

log = logging.getLogger(__name__)

DATASETS_DIR = "datasets"
"""Sub-folder of the output folder that holds the datasets built from uploads."""
COMPARE_DIR = "compare"
"""Sub-folder of the output folder that holds comparison grids."""
DATASET_INFO = ".dataset.json"
"""Per dataset: its display name and when it was made (hidden: training reads no file whose name starts with a
dot)."""
REJECTED_FILE = ".rejected.json"
"""Per dataset: the files of its last upload that were not used, with the reason."""
LARGE_IMAGE_SIDE = 4096
"""Images with a longer side than this are used, with a notice that they are resized for training."""
MAX_NAME_LENGTH = 60
RUNNING_STATES = ("starting", "training", "stopping")
RUN_STATES = ("training", "stopped", "finished", "failed")
"""A run's state in the runs list (`RunInfo.state`)."""
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
"""Failures that explain themselves: their message is shown without the exception's name."""


class JobBusy(RuntimeError):
    """Raised by `TrainingJobs.start` while another run is in progress."""


class UploadRejected(ValueError):
    """Raised when an upload adds no usable image; `skipped` lists every file with the reason."""

    def __init__(self, message: str, skipped: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.skipped = skipped


# ---------------------------------------------------------------------------------------------------------------
# The training job


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of the training job, safe to hand to another thread."""

    state: str = "idle"
    """idle (nothing started since the server started), starting (loading the model, encoding the data),
    training, stopping (a stop was asked for; the run saves and exports at the next step), finished,
    stopped, failed."""
    run_dir: Path | None = None
    method: str | None = None
    step: int = 0
    total: int = 0
    loss: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    losses: tuple[tuple[int, float], ...] = ()
    """(step, loss) for every step so far (of a resumed run: its earlier steps too)."""
    events: tuple[dict, ...] = ()
    """What the method did so far (`Method.after_step`: e.g. LoRA-Over's matrices given MPO cores)."""
    previews: tuple[tuple[int, str], ...] = ()
    """(step, grid image path) of the samples rendered while training (`sample_every`), step 0 the base."""
    error: str | None = None
    settings: dict | None = None
    """The run's flat settings (`TrainConfig.to_dict()`), from which a reloaded page restores its form."""

    @property
    def running(self) -> bool:
        """Whether a run is in progress (a new one cannot start)."""
        return self.state in RUNNING_STATES

    def to_dict(self) -> dict:
        """Return the snapshot as JSON-serialisable values, without the per-step loss list and the settings."""
        return {
            "state": self.state,
            "run": self.run_dir.name if self.run_dir else None,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "method": self.method,
            "step": self.step,
            "total": self.total,
            "loss": self.loss,
            "it_s": self.it_s,
            "eta_s": self.eta_s,
            "events": len(self.events),
            "previews": [path for _, path in self.previews],
            "error": self.error,
        }


class TrainingJobs:
    """Runs at most one `pipelines.train.train` at a time in a background thread; the page polls `status()`."""

    def __init__(self, runs_dir: str | Path, train_fn: Callable[..., Path] = train) -> None:
        self.runs_dir = Path(runs_dir)
        self._train = train_fn
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._status = JobStatus()
        self._losses: list[tuple[int, float]] = []
        self._events: list[dict] = []
        self._previews: list[tuple[int, str]] = []

    def start(self, cfg: TrainConfig) -> JobStatus:
        """Start training `cfg` in the background and return the first status.

        The run goes to `cfg.output_dir`, or to a new `<runs_dir>/<method>-<time>` folder, which is removed again
        if the run fails before it has written its settings. Raises JobBusy while another run is in progress.
        """
        with self._lock:
            if self._status.running:
                current = self._status
                raise JobBusy(
                    f"a run is already in progress ({current.run_dir.name}, step {current.step}/{current.total}); "
                    "stop it or wait for it to finish"
                )
            created = cfg.output_dir is None
            cfg = replace(cfg, output_dir=cfg.output_dir or new_run_dir(self.runs_dir, cfg.method))
            self._stop.clear()
            # A resumed run continues its loss curve and event log from the files it wrote.
            run = RunDir(cfg.output_dir)
            run.error.unlink(missing_ok=True)
            self._losses = run.read_losses() if cfg.resume is not None else []
            self._events = run.read_events() if cfg.resume is not None else []
            self._previews = [(step, str(path)) for step, path in run.sample_grids()] if cfg.resume is not None else []
            self._status = JobStatus("starting", run_dir=cfg.output_dir, method=cfg.method, total=cfg.max_steps or 0,
                                     step=len(self._losses), settings=cfg.to_dict())
            threading.Thread(target=self._run, args=(cfg, created), name="opdiff-train", daemon=True).start()
        return self.status()

    def stop(self) -> JobStatus:
        """Ask the running job to stop after its current step (it then saves and exports); return the status."""
        with self._lock:
            if self._status.running:
                self._stop.set()
                self._status = replace(self._status, state="stopping")
        return self.status()

    def status(self) -> JobStatus:
        """Return the current snapshot (the last run's final state once it has ended)."""
        with self._lock:  # the per-step lists are copied here, once per poll, not once per step
            return replace(self._status, losses=tuple(self._losses), events=tuple(self._events),
                           previews=tuple(self._previews))

    def training_dir(self) -> Path | None:
        """The folder of the run in progress, or None."""
        status = self.status()
        return status.run_dir if status.running else None

    def _on_event(self, event: dict) -> None:
        with self._lock:
            if "samples" in event:  # a sample grid rendered while training, not a step
                self._previews.append((event["step"], event["samples"]))
                return
            self._losses.append((event["step"], event["loss"]))
            self._events += event.get("events", [])
            self._status = replace(
                self._status,
                state="stopping" if self._stop.is_set() else "training",
                step=event["step"],
                total=event["total"],
                loss=event["loss"],
                it_s=event["it_s"],
                eta_s=event["eta_s"],
            )

    def _run(self, cfg: TrainConfig, created: bool) -> None:
        state, error = "finished", None
        try:
            self._train(cfg, on_event=self._on_event, should_stop=self._stop.is_set)
            if self._stop.is_set():
                state = "stopped"
        except Exception as e:  # noqa: BLE001 - any failure ends the job; the page shows it instead of a traceback
            log.exception("training run %s failed", cfg.output_dir)
            state, error = "failed", str(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}"
            run = RunDir(cfg.output_dir)
            if created and not run.is_run():  # failed before writing its settings: leave no empty folder
                shutil.rmtree(run.path, ignore_errors=True)
                error += " (nothing was saved)"
            else:
                run.write_error(error)
        with self._lock:
            self._status = replace(self._status, state=state, error=error, eta_s=0.0 if state == "finished" else None)


def new_run_dir(runs_dir: str | Path, method: str) -> Path:
    """Create and return a new, empty run folder `<runs_dir>/<method>-<YYYYmmdd-HHMMSS>[-k]`."""
    return _claim_dir(Path(runs_dir) / f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def _claim_dir(path: Path) -> Path:
    """Create `path`, or `path-2`, `path-3`, ... when taken; return the folder created (atomic via mkdir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        candidate = path if k == 1 else path.with_name(f"{path.name}-{k}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free folder name like {path}")


def loss_curves(losses: Sequence[tuple[int, float]], weight: float = 0.9,
                max_points: int = 1000) -> list[tuple[int, float, str]]:
    """Return (step, loss, series) rows of the raw loss and its smoothed line, at most `max_points` per series.

    Smoothing is an exponential moving average with bias correction (as TensorBoard's), so the line starts at the
    first loss instead of at 0. Long runs keep every k-th step of both lines.
    """
    rows_raw, rows_smooth, average = [], [], 0.0
    for i, (step, loss) in enumerate(losses, start=1):
        average = weight * average + (1 - weight) * loss
        rows_raw.append((step, loss, "raw"))
        rows_smooth.append((step, average / (1 - weight**i), "smoothed"))
    every = max(1, math.ceil(len(rows_raw) / max_points))
    keep = [i for i in range(len(rows_raw)) if i % every == 0 or i == len(rows_raw) - 1]
    return [rows_raw[i] for i in keep] + [rows_smooth[i] for i in keep]


# ---------------------------------------------------------------------------------------------------------------
# Methods and presets


def method_about(method: str) -> tuple[str, str]:
    """Return (a plain paragraph on what the adapter method does and costs, the paper section it implements)."""
    m = opdiff.METHODS[method]
    return m.about, m.ref


def list_presets() -> list[presets.Preset]:
    """Return the presets the Train form offers (the settings files shipped in `pipelines/presets`), by name."""
    return [presets.load(name) for name in presets.names()]


# ---------------------------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class RunInfo:
    """What the output folder says about one run."""

    path: Path
    method: str
    base: str
    dataset: str
    """The name of the dataset it trained on."""
    images: int
    steps: int
    """Steps recorded in losses.csv (the last checkpoint's, while the run is in progress)."""
    total: int
    """The steps it was set to train."""
    final_loss: float | None
    state: str
    """One of RUN_STATES: training (in this server), stopped (before its last step; it can continue), finished,
    failed (`error` says why)."""
    exported: bool
    """Whether the collapsed LoRA file exists (finished and stopped runs): it can be compared and exported."""
    resumable: bool
    """Whether a checkpoint to continue from exists."""
    updated: str
    """When its settings were last written (when it starts training and when it stops), as local
    "month-day hour:minute"."""
    error: str | None = None
    cmmd: dict | None = None
    """The run's latest score (cmmd.json), once it has been evaluated."""
    planned: int | None = None
    """The steps the run was planned to take; `steps` below it: a stopped run, whose LoRA is named partial."""

    @property
    def partial(self) -> bool:
        """Whether the run stopped before its planned steps."""
        return self.planned is not None and self.steps < self.planned

    @property
    def label(self) -> str:
        """How the page lists the run: name, method, steps (and how many were planned, for a stopped run)."""
        steps = f"{self.steps} of {self.planned} steps, partial" if self.partial else f"{self.steps} steps"
        return f"{self.name} ({self.method}, {steps})"

    @property
    def name(self) -> str:
        """The run folder's name: how the GUI and the API refer to a run."""
        return self.path.name


def list_runs(runs_dir: str | Path, training: Path | None = None) -> list[RunInfo]:
    """Return every run folder (one holding config.json) directly under `runs_dir`, newest first.

    `training` is the folder of the run in progress (its state is then `training`, whatever its files say).
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    configs = sorted(runs_dir.glob(f"*/{RunDir.CONFIG}"), key=lambda p: p.stat().st_mtime, reverse=True)
    runs = []
    for config_path in configs:
        run = RunDir(config_path.parent)
        try:
            config = run.read_config()
            losses = run.read_losses()
            total = config.get("schedule", {}).get("total_steps") or len(losses)
            error = run.read_error()
            if training is not None and run.path.resolve() == Path(training).resolve():
                state = "training"
            elif error is not None:
                state = "failed"
            elif run.lora.is_file() or run.checkpoint.is_file():
                state = "finished" if run.lora.is_file() and len(losses) >= total else "stopped"
            else:
                state, error = "failed", "ended before its first checkpoint"
            runs.append(RunInfo(
                path=run.path,
                method=config["method"],
                base=config["base"],
                dataset=dataset_name(Path(config["dataset"]["path"])),
                images=config["dataset"]["images"],
                steps=len(losses),
                total=total,
                final_loss=losses[-1][1] if losses else None,
                state=state,
                exported=run.current_lora().is_file(),
                resumable=run.checkpoint.is_file(),
                updated=datetime.fromtimestamp(config_path.stat().st_mtime).strftime("%m-%d %H:%M"),
                error=error,
                cmmd=run.read_cmmd(),
                planned=run.planned_steps(),
            ))
        except (OSError, ValueError, KeyError) as e:  # a folder being written or from elsewhere: list the rest
            log.warning("skipping %s: %s", run.path, e)
    return runs


def resolve_run(runs_dir: str | Path, name: str) -> Path:
    """Return the folder of run `name` under `runs_dir`; raises ValueError for anything that is not such a run.

    Names come from the page or the API, so a name that would leave `runs_dir` is refused.
    """
    path = Path(runs_dir) / name
    if not name or PurePosixPath(name).name != name or name in (".", "..") or not RunDir(path).is_run():
        raise ValueError(f"no run named {name!r} in {Path(runs_dir).name}")
    return path


def delete_run(runs_dir: str | Path, name: str, training: Path | None = None) -> None:
    """Delete run `name` and all its files; refused (ValueError) for the run in progress, `training`."""
    path = resolve_run(runs_dir, name)
    if training is not None and path.resolve() == Path(training).resolve():
        raise ValueError(f"run {name} is training: stop it before deleting it")
    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------------
# Named datasets from uploads


@dataclass
class DatasetView:
    """A dataset folder as the page shows it: usable images with their captions, and what was rejected."""

    root: Path
    rows: list[tuple[Path, str]]
    """(image, caption) for every usable image."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) for every file of the last upload that is not used, and any unusable file in the folder."""
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(file, notice) for images that are used but changed on the way (very large, converted to RGB)."""
    added: int = 0
    """Images the last upload added."""

    @property
    def name(self) -> str:
        """The dataset's display name."""
        return dataset_name(self.root)

    @property
    def uncaptioned(self) -> int:
        """How many images have an empty caption."""
        return sum(1 for _, caption in self.rows if not caption)


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset in the datasets folder."""

    path: Path
    name: str
    images: int
    """Image files in it (counted by extension, not decoded)."""


def dataset_name(root: str | Path) -> str:
    """Return the display name of dataset folder `root`: the name it was given, else the folder's name."""
    return _read_info(Path(root)).get("name") or Path(root).name


def _read_info(root: Path) -> dict:
    try:
        data = json.loads((root / DATASET_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def list_datasets(datasets_dir: str | Path) -> list[DatasetInfo]:
    """Return the datasets under `datasets_dir`, newest first."""
    datasets_dir = Path(datasets_dir)
    if not datasets_dir.is_dir():
        return []
    def created(p: Path) -> str:  # ISO times sort as text; a folder without one counts from its last change
        return _read_info(p).get("created") or datetime.fromtimestamp(p.stat().st_mtime).isoformat()

    folders = sorted((p for p in datasets_dir.iterdir() if p.is_dir()), key=created, reverse=True)
    return [DatasetInfo(p, dataset_name(p), sum(1 for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS))
            for p in folders]


def find_dataset(datasets_dir: str | Path, value: str | Path) -> Path:
    """Return the folder of the dataset `value` names: its folder (path or folder name) or its display name.

    Raises ValueError for anything that is not a dataset under `datasets_dir`.
    """
    datasets_dir = Path(datasets_dir).resolve()
    text = str(value).strip()
    if text:
        path = Path(text)
        candidate = path.resolve() if path.is_absolute() else datasets_dir / text
        if candidate.parent == datasets_dir and candidate.is_dir():
            return candidate
        for info in list_datasets(datasets_dir):
            if info.name.casefold() == text.casefold():
                return info.path
    raise ValueError(f"unknown dataset {text!r}: create it in the Dataset step first")


def create_dataset(datasets_dir: str | Path, name: str) -> Path:
    """Create an empty dataset named `name` under `datasets_dir`; return its folder.

    The folder is named after the name (letters, digits and dashes); the name itself is kept as given and may
    later change (`rename_dataset`) without moving the folder, so runs that trained on it still find it.
    Raises ValueError for an empty, overlong or taken name.
    """
    name = _check_name(datasets_dir, name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "dataset"
    root = _claim_dir(Path(datasets_dir) / slug)
    _write_info(root, {"name": name, "created": datetime.now().isoformat()})
    return root


def rename_dataset(root: str | Path, name: str) -> None:
    """Give dataset `root` a new display name (its folder stays); ValueError for an empty or taken name."""
    root = Path(root)
    name = _check_name(root.parent, name, ignore=root)
    _write_info(root, {**_read_info(root), "name": name})


def delete_dataset(root: str | Path, in_use: Path | None = None) -> None:
    """Delete dataset folder `root` with its images; refused (ValueError) while the run in progress reads it.

    `in_use` is the dataset of the run in progress. Runs that trained on the dataset keep their LoRA files and
    can be compared and exported, but no longer evaluated (CMMD compares against the training images).
    """
    root = Path(root)
    if in_use is not None and root.resolve() == Path(in_use).resolve():
        raise ValueError(f"dataset {dataset_name(root)!r} is being trained on: stop the run before deleting it")
    shutil.rmtree(root)


def _check_name(datasets_dir: str | Path, name: str, ignore: Path | None = None) -> str:
    name = " ".join(str(name or "").split())
    if not name:
        raise ValueError("give the dataset a name")
    if len(name) > MAX_NAME_LENGTH or any(c in name for c in "/\\"):
        raise ValueError(f"a dataset name has at most {MAX_NAME_LENGTH} characters and no / or \\")
    for info in list_datasets(datasets_dir):
        if info.name.casefold() == name.casefold() and info.path != ignore:
            raise ValueError(f"a dataset named {info.name!r} already exists; choose another name")
    return name


def _write_info(root: Path, data: dict) -> None:
    (root / DATASET_INFO).write_text(json.dumps(data, indent=2), encoding="utf-8")


def add_files(root: str | Path, files: Sequence[str | Path]) -> DatasetView:
    """Add uploaded files to dataset folder `root`; return its view, with what this upload added and refused.

    Reads images (png/jpg/jpeg/webp) with same-name `.txt` captions or a `metadata.jsonl`, and `.zip` files of
    either, each with `scan_dataset` (which refuses unsafe zips and names every file it does not use). Images
    without a caption get an empty one, to be typed in the page. Every usable image is stored with a `.txt`
    caption, whatever form it came in, so captions are edited one way. A refused file is named as the user named
    it, with a short reason. Raises UploadRejected when the upload adds no image.
    """
    root = Path(root)
    view = DatasetView(root, [])
    with tempfile.TemporaryDirectory(prefix="opdiff-upload-") as staging_dir:
        loose = Path(staging_dir) / "files"
        loose.mkdir()
        for k, upload in enumerate(map(Path, files)):
            if upload.suffix.lower() == ".zip":
                _add_scanned(view, upload, f"{upload.name}: ", extract_to=Path(staging_dir) / f"zip-{k}")
            else:  # scan_dataset names whatever is not an image, a caption or metadata.jsonl
                shutil.copy(upload, loose / upload.name)
        if any(loose.iterdir()):
            _add_scanned(view, loose, "")
    view.skipped = [(name, _plain(reason)) for name, reason in view.skipped]
    (root / REJECTED_FILE).write_text(json.dumps(view.skipped, indent=2), encoding="utf-8")
    if not view.rows:
        detail = "; ".join(f"{n}: {r}" for n, r in view.skipped) or "no files"
        raise UploadRejected(f"nothing was added ({detail})", view.skipped)
    return replace(open_dataset(root), added=len(view.rows), notes=view.notes)


def _add_scanned(view: DatasetView, source: Path, prefix: str, **scan_options: object) -> None:
    """Scan `source` (folder or zip) with `scan_dataset` and copy its usable images, with `.txt` captions, into
    the dataset of `view`; add them, the refused files and the notices (names prefixed with `prefix`) to `view`."""
    try:
        dataset = scan_dataset(source, caption="", allow_empty=True, **scan_options)
    except ValueError as e:  # a refused zip
        view.skipped.append((prefix.removesuffix(": ") or source.name, str(e)))
        return
    view.skipped += [(prefix + name, reason) for name, reason in dataset.skipped]
    view.notes += [(prefix + name, note) for name, note in dataset.converted]
    for ex in dataset.examples:
        target = view.root / ex.path.name
        caption_file = target.with_suffix(CAPTION_EXTENSION)
        if target.exists() or caption_file.exists():
            view.skipped.append((prefix + ex.path.name, "the dataset already has a file of this name; rename the "
                                 "file or remove the other one first"))
            continue
        shutil.copy(ex.path, target)
        caption_file.write_text(ex.caption, encoding="utf-8")
        view.rows.append((target, ex.caption))
        height, width = ex.size
        if max(ex.size) > LARGE_IMAGE_SIDE:
            view.notes.append((prefix + ex.path.name, f"{width}x{height} pixels: used, and scaled down to the "
                               "training resolution when training (1024 px for SDXL)"))


def _plain(reason: str) -> str:
    """A refusal reason as a user reads it: no file system paths and no exception names."""
    reason = re.sub(r"\s*\(\w+(?:Error|Exception|Warning)\b.*\)$", "", reason)  # PIL's "(...Error: ...)"
    reason = re.sub(r"\b\w+(?:Error|Exception): ", "", reason)
    reason = re.sub(r"(?:[A-Za-z]:)?[/\\][^\s'\"]*[/\\]([^\s'\"/\\]+)", r"\1", reason)  # /tmp/x/a.png -> a.png
    if reason == "not a readable image":
        reason += ": the file is damaged or not a PNG, JPEG or WEBP image"
    return reason


def open_dataset(root: str | Path) -> DatasetView:
    """Return the view of a dataset folder: its usable images and captions, and what was rejected (at upload
    time and now). An empty dataset has no rows."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset {root.name!r} does not exist")
    dataset = scan_dataset(root, allow_empty=True)
    rejected_path = root / REJECTED_FILE
    rejected = json.loads(rejected_path.read_text(encoding="utf-8")) if rejected_path.is_file() else []
    skipped = [tuple(r) for r in rejected] + [(n, _plain(r)) for n, r in dataset.skipped]
    return DatasetView(root, [(ex.path, ex.caption) for ex in dataset.examples], skipped)


def remove_images(root: str | Path, names: Sequence[str]) -> DatasetView:
    """Delete images (with their captions) from dataset folder `root`; return the updated view.

    Raises ValueError, before deleting anything, for a name that is not an image of the dataset.
    """
    root = Path(root)
    images = {p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    unknown = [n for n in names if n not in images]
    if unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))} is not an image of dataset {dataset_name(root)!r}")
    for name in names:
        (root / name).unlink()
        (root / name).with_suffix(CAPTION_EXTENSION).unlink(missing_ok=True)
    return open_dataset(root)


def save_captions(root: str | Path, captions: Sequence[tuple[str, str]]) -> DatasetView:
    """Write (image file name, caption) pairs as the images' `.txt` captions in dataset folder `root`; return
    the updated view. Raises ValueError for a name that is not an image of the dataset."""
    root = Path(root)
    if (root / METADATA_FILE).is_file():
        raise ValueError(f"{root.name} takes its captions from {METADATA_FILE}; edit that file instead")
    images = {p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    for name, caption in captions:
        if name not in images:
            raise ValueError(f"{name!r} is not an image of dataset {dataset_name(root)!r}")
        (root / name).with_suffix(CAPTION_EXTENSION).write_text(str(caption).strip(), encoding="utf-8")
    return open_dataset(root)


# ---------------------------------------------------------------------------------------------------------------
# Compare and evaluate


def compare_runs(
    run_dirs: Sequence[Path],
    out_dir: str | Path,
    prompts: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    steps: int | None = None,
    base: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Comparison, Path]:
    """Render base and each run's LoRA on the same prompts, seeds and initial noise; return them and the grid.

    All runs must share one base model and VAE (the VAE they trained with); with no runs, `base` alone is rendered.
    Prompts and steps default to the first run's sample settings. The grid is written to
    `out_dir/compare-<time>.png`. `progress(done, total)` is called after each image.
    """
    runs = [RunDir(r) for r in run_dirs]
    configs = [run.read_config() for run in runs]
    bases = {c["base"] for c in configs} | ({base} if base else set())
    if len(bases) != 1:
        raise ValueError(f"runs to compare must share one base model; these use {', '.join(sorted(bases)) or 'none'}")
    missing = [run.name for run in runs if not run.current_lora().is_file()]
    if missing:
        raise ValueError(f"run(s) {', '.join(missing)} have no LoRA file yet (still training or failed)")
    vaes = {c["train"].get("vae") for c in configs}  # the runs' VAE, as they trained and sampled with it
    if len(vaes) > 1:
        raise ValueError(f"runs to compare must share one VAE; these use {', '.join(sorted(map(str, vaes)))}")
    first = configs[0]["train"] if configs else {}
    comparison = sample(SampleConfig(
        bases.pop(), lora=tuple(run.current_lora() for run in runs),
        prompt=tuple(prompts or first.get("sample_prompts", ())),
        seed=tuple(seeds), steps=steps or first.get("sample_steps"), vae=vaes.pop() if vaes else None), progress)
    comparison.titles = ["base"] + [run.name for run in runs]
    grid = save_grid(comparison, Path(out_dir) / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.png")
    return comparison, grid


def save_cells(comparison: Comparison, folder: str | Path) -> list[list[Path]]:
    """Save every image of `comparison` as `folder/row<r>-col<c>.png`; return the paths by row, then column."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r, (_, images) in enumerate(comparison.rows):
        paths.append([])
        for c, image in enumerate(images):
            image.save(folder / f"row{r}-col{c}.png")
            paths[-1].append(folder / f"row{r}-col{c}.png")
    return paths


@functools.lru_cache(maxsize=2)
def cached_embedder(clip_model: str | None, clip_checkpoint: str | None) -> ClipEmbedder:
    """Return `pipelines.evaluate.load_embedder` of these options, loaded once per process (the reference CLIP
    takes seconds to build)."""
    return load_embedder(ClipOptions.from_dict({"clip_model": clip_model, "clip_checkpoint": clip_checkpoint}))


# ---------------------------------------------------------------------------------------------------------------
# Using exported files


WHERE_TO_PUT = {
    "kohya": "ComfyUI: put it in `ComfyUI/models/loras/` and load it with a *Load LoRA* node. AUTOMATIC1111 and "
             "Forge: put it in `models/Lora/` and write `<lora:{stem}:{scale}>` in the prompt.",
    "lycoris": "sd-scripts or any program with LyCORIS: load it as a LyCORIS network (`models/Lora/` in "
               "AUTOMATIC1111 with the LyCORIS extension: `<lora:{stem}:{scale}>`).",
    "comfyui": "ComfyUI: put it in `ComfyUI/models/loras/` (*Load LoRA* node). Forge: `models/Lora/`, then "
               "`<lora:{stem}:{scale}>` in the prompt. Use it with the base model it was trained on.",
    "a1111": "AUTOMATIC1111: put it in `models/Lora/` and write `<lora:{stem}:{scale}>` in the prompt; any program "
             "that reads plain LoRA files loads it the same way.",
}
"""Per exported file kind (`pipelines.export.KINDS`), where a person puts the file; diffusers gets code instead."""


def lora_scale(run_dir: str | Path) -> tuple[float, str]:
    """Return the LoRA scale that reproduces the run (1.0: alpha / rank is stored in the file) and a sentence
    saying so."""
    adapter = RunDir(run_dir).read_config()["adapter"]
    return 1.0, (f"LoRA scale (strength) 1.0 reproduces what the run learned; its alpha {adapter['alpha']:g} / "
                 f"rank {adapter['rank']} is stored in the file. Lower it to weaken the effect.")


def load_snippet(run_dir: str | Path, lora_file: str | Path, scale: float = 1.0) -> str:
    """Return Python code that loads `lora_file` into the run's base model with diffusers and renders a sample."""
    config = RunDir(run_dir).read_config()
    base, prompts = config["base"], config["train"]["sample_prompts"]
    loader = "from_single_file" if Path(base).is_file() else "from_pretrained"
    prompt = prompts[0] if prompts else DEFAULT_PROMPTS[0]
    return (
        "import torch\n"
        "from diffusers import StableDiffusionXLPipeline\n\n"
        f"pipe = StableDiffusionXLPipeline.{loader}({base!r}, dtype=torch.float16).to(\"cuda\")\n"
        f"pipe.load_lora_weights({Path(lora_file).name!r}, adapter_name=\"opdiff\")  # the downloaded file\n"
        f"pipe.set_adapters(\"opdiff\", adapter_weights={scale})  # LoRA scale: {scale} = as trained\n"
        f"image = pipe({prompt!r}).images[0]\n"
        "image.save(\"sample.png\")\n"
    )


def usage(run_dir: str | Path, files: dict[str, Path]) -> str:
    """Return Markdown saying, for each exported file, which programs it is for and how to use it there."""
    scale, scale_note = lora_scale(run_dir)
    parts = [scale_note]
    for kind, path in files.items():
        parts.append(f"**{path.name}**: {purpose(path)}.")
        if kind == "diffusers":
            parts.append(f"```python\n{load_snippet(run_dir, path, scale)}```")
        else:
            parts.append(WHERE_TO_PUT[kind].format(stem=path.stem, scale=f"{scale:g}"))
    return "\n\n".join(parts)
