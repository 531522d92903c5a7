"""Everything the GUI needs that is not a widget: one background training job, datasets built from uploads,
and listings of the runs in an output folder.

State lives here, in the server process, not in a browser session: closing or reloading the page neither stops a
run nor loses its progress, and the page finds everything again by polling `TrainingJobs.status()` and listing
the output folder.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath

from metrics import ClipEmbedder
from pipelines.config import TrainConfig
from pipelines.data import CAPTION_EXTENSION, IMAGE_EXTENSIONS, METADATA_FILE, scan_dataset
from pipelines.evaluate import ClipOptions, load_embedder
from pipelines.rundir import RunDir
from pipelines.sample import DEFAULT_PROMPTS, Comparison, SampleConfig, sample, save_grid
from pipelines.train import train

log = logging.getLogger(__name__)

DATASETS_DIR = "datasets"
"""Sub-folder of the output folder that holds the datasets built from uploads."""
COMPARE_DIR = "compare"
"""Sub-folder of the output folder that holds comparison grids."""
REJECTED_FILE = ".rejected.json"
"""Per uploaded dataset: the uploaded files that were not used, with the reason (hidden: not dataset content)."""
RUNNING_STATES = ("starting", "training", "stopping")


class JobBusy(RuntimeError):
    """Raised by `TrainingJobs.start` while another run is in progress."""


class UploadRejected(ValueError):
    """Raised when an upload leaves no usable image; `skipped` lists every file with the reason."""

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
    error: str | None = None

    @property
    def running(self) -> bool:
        """Whether a run is in progress (a new one cannot start)."""
        return self.state in RUNNING_STATES

    def to_dict(self) -> dict:
        """Return the snapshot as JSON-serialisable values, without the per-step loss list."""
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

    def start(self, cfg: TrainConfig) -> JobStatus:
        """Start training `cfg` in the background and return the first status.

        The run goes to `cfg.output_dir`, or to a new `<runs_dir>/<method>-<time>` folder. Raises JobBusy while
        another run is in progress.
        """
        with self._lock:
            if self._status.running:
                current = self._status
                raise JobBusy(
                    f"a run is already in progress ({current.run_dir.name}, step {current.step}/{current.total}); "
                    "stop it or wait for it to finish"
                )
            cfg = replace(cfg, output_dir=cfg.output_dir or new_run_dir(self.runs_dir, cfg.method))
            self._stop.clear()
            # A resumed run continues its loss curve and event log from the files it wrote.
            run = RunDir(cfg.output_dir)
            self._losses = run.read_losses() if cfg.resume is not None else []
            self._events = run.read_events() if cfg.resume is not None else []
            self._status = JobStatus("starting", run_dir=cfg.output_dir, method=cfg.method, total=cfg.max_steps or 0,
                                     step=len(self._losses))
            threading.Thread(target=self._run, args=(cfg,), name="opdiff-train", daemon=True).start()
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
            return replace(self._status, losses=tuple(self._losses), events=tuple(self._events))

    def _on_event(self, event: dict) -> None:
        with self._lock:
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

    def _run(self, cfg: TrainConfig) -> None:
        state, error = "finished", None
        try:
            self._train(cfg, on_event=self._on_event, should_stop=self._stop.is_set)
            if self._stop.is_set():
                state = "stopped"
        except Exception as e:  # noqa: BLE001 - any failure ends the job; the page shows it instead of a traceback
            log.exception("training run %s failed", cfg.output_dir)
            state, error = "failed", f"{type(e).__name__}: {e}"
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


# ---------------------------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class RunInfo:
    """What the output folder says about one run."""

    path: Path
    method: str
    base: str
    images: int
    steps: int
    """Steps recorded in losses.csv (the last checkpoint's, while the run is in progress)."""
    final_loss: float | None
    finished: bool
    """Whether the collapsed LoRA of the run as it stands exists (`RunDir.current_lora`; partial for a stopped run)."""
    resumable: bool
    """Whether a checkpoint to continue from exists."""
    cmmd: dict | None = None
    """The run's cmmd.json, once it has been evaluated."""
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


def list_runs(runs_dir: str | Path) -> list[RunInfo]:
    """Return every run folder (one holding config.json) directly under `runs_dir`, newest first."""
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
            runs.append(RunInfo(
                path=run.path,
                method=config["method"],
                base=config["base"],
                images=config["dataset"]["images"],
                steps=len(losses),
                final_loss=losses[-1][1] if losses else None,
                finished=run.current_lora().is_file(),
                resumable=run.checkpoint.is_file(),
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
        raise ValueError(f"no run named {name!r} in {runs_dir}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Datasets from uploads


@dataclass
class DatasetView:
    """A dataset folder as the page shows it: usable images with their captions, and what was rejected."""

    root: Path
    rows: list[tuple[Path, str]]
    """(image, caption) for every usable image."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) for every uploaded file that is not used."""

    @property
    def uncaptioned(self) -> int:
        """How many images have an empty caption."""
        return sum(1 for _, caption in self.rows if not caption)


def import_upload(files: Sequence[str | Path], datasets_dir: str | Path) -> DatasetView:
    """Build a new dataset folder under `datasets_dir` from uploaded files and return its view.

    Reads images (png/jpg/jpeg/webp) with same-name `.txt` captions or a `metadata.jsonl`, and `.zip` files of
    either, each with `scan_dataset` (which refuses unsafe zips and names every file it does not use). Loose
    images without a caption get an empty one, to be typed in the page; inside a zip the captions must be
    complete. Every usable image is stored with a `.txt` caption, whatever form it came in, so captions are
    edited one way. Raises UploadRejected, listing every file and why, when nothing is usable.
    """
    root = _claim_dir(Path(datasets_dir) / f"upload-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
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
            _add_scanned(view, loose, "", caption="")
    if not view.rows:
        shutil.rmtree(root)
        detail = "; ".join(f"{n}: {r}" for n, r in view.skipped) or "no files"
        raise UploadRejected(f"nothing usable in the upload ({detail})", view.skipped)
    (root / REJECTED_FILE).write_text(json.dumps(view.skipped, indent=2), encoding="utf-8")
    return view


def _add_scanned(view: DatasetView, source: Path, prefix: str, **scan_options: object) -> None:
    """Scan `source` (folder or zip) with `scan_dataset` and copy its usable images, with `.txt` captions, into
    the dataset of `view`; add them and the rejected entries (names prefixed with `prefix`) to `view`."""
    try:
        dataset = scan_dataset(source, **scan_options)
    except ValueError as e:  # a refused zip, or nothing usable in it
        view.skipped.append((prefix.removesuffix(": ") or source.name, str(e)))
        return
    view.skipped += [(prefix + name, reason) for name, reason in dataset.skipped]
    for ex in dataset.examples:
        target = view.root / ex.path.name
        caption_file = target.with_suffix(CAPTION_EXTENSION)
        if target.exists() or caption_file.exists():
            view.skipped.append((prefix + ex.path.name, "an image of this name is already in the dataset"))
            continue
        shutil.copy(ex.path, target)
        caption_file.write_text(ex.caption, encoding="utf-8")
        view.rows.append((target, ex.caption))


def open_dataset(root: str | Path) -> DatasetView:
    """Return the view of a dataset folder: its usable images and captions, and what was rejected (at upload
    time and now). Raises ValueError when it holds no usable image."""
    root = Path(root)
    dataset = scan_dataset(root)
    rejected_path = root / REJECTED_FILE
    rejected = [tuple(r) for r in json.loads(rejected_path.read_text(encoding="utf-8"))] if rejected_path.is_file() else []
    return DatasetView(root, [(ex.path, ex.caption) for ex in dataset.examples], rejected + dataset.skipped)


def save_captions(root: str | Path, captions: Sequence[tuple[str, str]]) -> DatasetView:
    """Write (image file name, caption) pairs as the images' `.txt` captions in dataset folder `root`; return
    the updated view. Raises ValueError for a name that is not an image of the dataset."""
    root = Path(root)
    if (root / METADATA_FILE).is_file():
        raise ValueError(f"{root} takes its captions from {METADATA_FILE}; edit that file instead")
    images = {p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    for name, caption in captions:
        if name not in images:
            raise ValueError(f"{name!r} is not an image of dataset {root.name}")
        (root / name).with_suffix(CAPTION_EXTENSION).write_text(str(caption).strip(), encoding="utf-8")
    return open_dataset(root)


def list_datasets(datasets_dir: str | Path) -> list[Path]:
    """Return the uploaded dataset folders under `datasets_dir`, newest first."""
    datasets_dir = Path(datasets_dir)
    if not datasets_dir.is_dir():
        return []
    return sorted((p for p in datasets_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)


# ---------------------------------------------------------------------------------------------------------------
# Compare and evaluate


def compare_runs(
    run_dirs: Sequence[Path],
    out_dir: str | Path,
    prompts: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    steps: int | None = None,
    base: str | None = None,
) -> tuple[Comparison, Path]:
    """Render base and each run's LoRA on the same prompts, seeds and initial noise; return them and the grid.

    All runs must share one base model and VAE (the VAE they trained with); with no runs, `base` alone is rendered.
    Prompts and steps default to the first run's sample settings. The grid is written to
    `out_dir/compare-<time>.png`.
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
        bases.pop(), lora=tuple(run.current_lora() for run in runs), prompt=tuple(prompts or first.get("sample_prompts", ())),
        seed=tuple(seeds), steps=steps or first.get("sample_steps"), vae=vaes.pop() if vaes else None))
    comparison.titles = ["base"] + [run.name for run in runs]
    grid = save_grid(comparison, Path(out_dir) / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.png")
    return comparison, grid


@functools.lru_cache(maxsize=2)
def cached_embedder(clip_model: str | None, clip_checkpoint: str | None) -> ClipEmbedder:
    """Return `pipelines.evaluate.load_embedder` of these options, loaded once per process (the reference CLIP
    takes seconds to build)."""
    return load_embedder(ClipOptions.from_dict({"clip_model": clip_model, "clip_checkpoint": clip_checkpoint}))


def load_snippet(run_dir: str | Path, lora_file: str | Path) -> str:
    """Return Python code that loads `lora_file` into the run's base model with diffusers and renders a sample."""
    config = RunDir(run_dir).read_config()
    base, prompts = config["base"], config["train"]["sample_prompts"]
    loader = "from_single_file" if Path(base).is_file() else "from_pretrained"
    prompt = prompts[0] if prompts else DEFAULT_PROMPTS[0]
    return (
        "import torch\n"
        "from diffusers import StableDiffusionXLPipeline\n\n"
        f"pipe = StableDiffusionXLPipeline.{loader}({base!r}, dtype=torch.float16).to(\"cuda\")\n"
        f"pipe.load_lora_weights({Path(lora_file).name!r})  # the downloaded file\n"
        f"image = pipe({prompt!r}).images[0]\n"
        "image.save(\"sample.png\")\n"
    )
