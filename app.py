"""opdiff in the browser: upload images, train an adapter, compare, score with CMMD, download the LoRA.

    python app.py [--host 127.0.0.1] [--port 7860] [--output-dir runs] [--max-upload-mb 500] [--auth USER:PASSWORD]
    (or: opdiff-app ...; OPDIFF_APP_AUTH=USER:PASSWORD sets the login without showing it in the process list)

A thin shell over `pipelines`: widgets and glue only. Training runs in `pipelines.jobs.TrainingJobs`, a
background worker the page polls, so closing or reloading the page neither stops nor loses a run. Every event
handler has an `api_name`, so `gradio_client` drives the app exactly as the page does.
"""

from __future__ import annotations

import os

# Before gradio is imported: it reads these at import time. No usage reports leave the machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import html  # noqa: E402
import inspect  # noqa: E402
import ipaddress  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import typing  # noqa: E402
import uuid  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from opdiff.settings import GROUPS, Setting  # noqa: E402
from pipelines import jobs  # noqa: E402
from pipelines.config import BUNDLED_DATA, TrainConfig, resume_config  # noqa: E402
from pipelines.evaluate import (  # noqa: E402
    DEMO_CLIP,
    ClipWeightsMissing,
    EvalConfig,
    evaluate_run,
    score_note,
    trust_label,
)
from pipelines.export import DTYPE_NAMES, DTYPE_SUFFIXES, DTYPES, FORMATS, ExportConfig, export, purpose  # noqa: E402
from pipelines.rundir import RunDir  # noqa: E402

EXPORT_DEFAULTS = ExportConfig(Path("."))
"""The export settings' defaults (the command line's too)."""
GUI_CACHE_DIR = ".gradio"
"""Sub-folder of the output folder for uploads and the files the page shows: nothing is served from elsewhere (the
runs and datasets beside it are not served at all; a file the page offers is handed out as a copy in here)."""
HANDED_OUT_DIR = "handed-out"
"""Sub-folder of GUI_CACHE_DIR holding the files offered for download (exports, grids), one folder per offer."""
AUTH_ENV = "OPDIFF_APP_AUTH"
"""Environment variable with the login, USER:PASSWORD (read when --auth is not given)."""
CACHE_DIR = "cache"
"""Sub-folder of the output folder where runs keep image latents and caption embeddings for later runs."""
POLL_SECONDS = 1.0
THUMBNAIL_PX = 256

GROUP_TITLES = {"method": "Method settings", "data": "Captions and images", "sampling": "Sample images",
                "advanced": "Advanced"}


def form_settings() -> list[Setting]:
    """The training form's settings: TrainConfig's, read from the registry now (a method registered at run time
    brings its own), without the run folder, which the app chooses (a new one for every run)."""
    return [s for s in TrainConfig.settings() if s.name not in ("output_dir", "resume", "overwrite")]


def form_spec(method: str) -> dict[str, list[str]]:
    """The training form for `method`: {group: names of the settings shown}, in the order shown.

    Built from TrainConfig's settings (`opdiff.settings.Setting`): one widget per setting, laid out by group; a
    method's own settings are shown only while a method that reads them is chosen.
    """
    spec: dict[str, list[str]] = {g: [] for g in GROUPS}
    for s in form_settings():
        if s.applies_to(method):
            spec[s.group].append(s.name)
    return {g: names for g, names in spec.items() if names}


def _info(s: Setting) -> str:
    """A widget's help line: plain help, what an empty box means, and the source in brackets."""
    text = s.help
    if s.optional and s.none_means:
        text += f" Empty: {s.none_means}."
    return text + (f" [{s.ref}]" if s.ref else "")


def _widget(s: Setting, visible: bool = True) -> gr.components.Component:
    """The form widget for one setting, typed from its description."""
    common = {"label": s.title, "info": _info(s), "elem_id": f"field-{s.name}", "visible": visible}
    if s.base_type is bool:
        return gr.Checkbox(s.default, **common)
    if s.allowed is not None:
        labels = [f"{c}: {h}" for c, h in zip(s.allowed, s.choice_help, strict=True)] if s.choice_help else s.allowed
        return gr.Dropdown(list(zip(labels, s.allowed, strict=True)), value=s.default, **common)
    if s.is_list:
        return gr.Textbox("\n".join(map(str, s.default)), lines=2, **{**common, "info": common["info"] +
                                                                        " One per line."})
    if s.item_type in (int, float):
        return gr.Number(s.default, precision=0 if s.item_type is int else None, **common)
    return gr.Textbox("" if s.default is None else str(s.default), **common)


def _config_from_form(values: dict) -> TrainConfig:
    """Turn the form's values into a TrainConfig; an empty box (or 0 where 0 is not allowed) of an optional
    setting means its default."""
    settings = {s.name: s for s in TrainConfig.settings()}
    clean = {}
    for name, value in values.items():
        s = settings[name]
        if s.optional and value == 0 and s.item_type in (int, float):
            try:
                s.check(0)
            except ValueError:  # an emptied number box sends 0
                value = None
        clean[name] = value
    try:
        return TrainConfig.from_dict(clean)
    except ValueError as e:
        raise gr.Error(str(e)) from e


def _keyword_handler(fn: typing.Callable[..., tuple], names: typing.Iterable[str]) -> typing.Callable[..., tuple]:
    """`fn(**values)` behind the explicit signature `(*, <name>=None, ...)`: gradio names the API's parameters
    after it, and a parameter whose widget starts empty (an optional number) becomes optional for API callers."""

    def handler(**values: object) -> tuple:
        return fn(**values)

    handler.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names]
    )
    return handler


class App:
    """The handlers, bound to one output folder and one training worker."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.datasets_dir = output_dir / jobs.DATASETS_DIR
        self.jobs = jobs.TrainingJobs(output_dir)

    # -- lists the page refreshes on load and on tab changes

    def dataset_choices(self) -> list[tuple[str, str]]:
        """(label, folder) of every dataset training may use: the uploads, newest first, then the bundled demo."""
        uploaded = [(p.name, str(p)) for p in jobs.list_datasets(self.datasets_dir)]
        return uploaded + [(f"bundled demo images ({BUNDLED_DATA.name})", str(BUNDLED_DATA))]

    def refresh(self, dataset: str | None = None, compare_runs: list[str] | None = None,
                eval_runs: list[str] | None = None, export_run: str | None = None,
                resume_run: str | None = None) -> tuple:
        """Page load and tab changes: fresh dataset and run lists (keeping valid selections) and the score table.

        Returns updates for the training dataset, the dataset on view, the compare, evaluate, export and resume
        run pickers, and the score table."""
        datasets, all_runs = self.dataset_choices(), jobs.list_runs(self.output_dir)
        runs = [(r.label, r.name) for r in all_runs if r.finished]  # stopped runs too: their LoRA is partial
        resumable = [(r.label, r.name) for r in all_runs if r.resumable]
        names = {value for _, value in runs}
        dataset = dataset if dataset in {v for _, v in datasets} else datasets[0][1]
        return (
            gr.update(choices=datasets, value=dataset),
            gr.update(choices=datasets, value=dataset),
            gr.update(choices=runs, value=[r for r in compare_runs or [] if r in names]),
            gr.update(choices=runs, value=[r for r in eval_runs or [] if r in names]),
            gr.update(choices=runs, value=export_run if export_run in names else (runs[0][1] if runs else None)),
            gr.update(choices=resumable, value=resume_run if resume_run in {v for _, v in resumable} else None),
            self.score_table(),
        )

    def _dataset_path(self, value: str | None) -> Path:
        """The dataset folder a page/API value names: the bundled demo or an uploaded dataset, nothing else."""
        path = Path(value or BUNDLED_DATA).resolve()
        if path == BUNDLED_DATA.resolve() or path.parent == self.datasets_dir.resolve():
            return path
        raise gr.Error(f"unknown dataset {value!r}: upload it in the Dataset tab")

    # -- Dataset tab

    def _dataset_outputs(self, view: jobs.DatasetView, prefix: str = "") -> tuple:
        gallery = [(_thumbnail(p), caption or "(no caption)") for p, caption in view.rows]
        table = [[p.name, caption] for p, caption in view.rows]
        message = f"{prefix}Dataset **{view.root.name}**: {len(view.rows)} usable image(s)"
        message += f", {len(view.skipped)} file(s) rejected (reasons below)." if view.skipped else "."
        if view.uncaptioned:
            message += (f" {view.uncaptioned} image(s) have no caption yet: type one in the table and press "
                        "Save captions.")
        return gallery, table, [list(r) for r in view.skipped] or None, message

    def upload_dataset(self, files: list[str] | None) -> tuple:
        """Build a dataset from uploaded images/captions/zips; show it, and select it for training."""
        if not files:
            raise gr.Error("choose images (with .txt captions) or a .zip first")
        try:
            view = jobs.import_upload(files, self.datasets_dir)
        except jobs.UploadRejected as e:
            gr.Warning(str(e))
            refused = f"**Upload refused.** {html.escape(str(e))}"
            # The dataset on view stays as it was; only the refusal and its reasons are shown.
            return gr.update(), gr.update(), gr.update(), gr.update(), [list(r) for r in e.skipped], refused
        if view.skipped:
            gr.Warning(f"{len(view.skipped)} uploaded file(s) rejected; the reasons are listed under the table")
        choices = self.dataset_choices()
        # One update per dropdown: gradio consumes an update while applying it.
        return (gr.update(choices=choices, value=str(view.root)), gr.update(choices=choices, value=str(view.root)),
                *self._dataset_outputs(view))

    def show_dataset(self, dataset: str | None = None) -> tuple:
        """Thumbnails, captions and rejected files of the selected dataset."""
        try:
            return self._dataset_outputs(jobs.open_dataset(self._dataset_path(dataset)))
        except ValueError as e:
            raise gr.Error(str(e)) from e

    def save_captions(self, dataset: str | None, table: list[list[str]] | None) -> tuple:
        """Write the edited captions next to the images."""
        path = self._dataset_path(dataset)
        if path == BUNDLED_DATA.resolve():
            raise gr.Error("the bundled demo images are read-only; upload your own images to edit captions")
        try:
            view = jobs.save_captions(path, [(row[0], row[1]) for row in table or [] if row and row[0]])
        except ValueError as e:
            raise gr.Error(str(e)) from e
        return self._dataset_outputs(view, "Captions saved. ")

    # -- Train tab

    def start_training(self, **form: object) -> tuple:
        """Start a run with the form's settings; refused with a message while another run is in progress."""
        form["data"] = self._dataset_path(typing.cast(str, form.get("data")))
        cfg = _config_from_form(form)
        if cfg.cache_dir is None:  # runs on the same images then encode them once
            cfg = replace(cfg, cache_dir=self.output_dir / CACHE_DIR)
        try:
            self.jobs.start(cfg)
        except jobs.JobBusy as e:
            raise gr.Error(str(e)) from e
        return self.poll()

    def resume_training(self, run: str | None, max_steps: float | None = None) -> tuple:
        """Continue a stopped run from its checkpoint (with the loss curve an uninterrupted run would have had)."""
        changes = {"max_steps": int(max_steps)} if max_steps else {}
        try:
            self.jobs.start(resume_config(self._run(run), **changes))
        except (jobs.JobBusy, ValueError) as e:
            raise gr.Error(str(e)) from e
        return self.poll()

    def method_changed(self, method: str) -> list:
        """Show the settings the chosen method reads, hide the other methods' settings."""
        return [gr.update(visible=s.applies_to(method)) for s in form_settings() if s.read_by is not None]

    def stop_training(self) -> tuple:
        """Ask the run to stop after its current step; it still saves and exports what it has."""
        self.jobs.stop()
        return self.poll()

    def poll(self) -> tuple:
        """The training status the page shows: progress line, loss curve, selection log, raw status."""
        status = self.jobs.status()
        # Typed even when empty: the plot fixes its axes' kind (numbers, not categories) from the first value.
        losses = pd.DataFrame(status.losses, columns=["step", "loss"]).astype({"step": int, "loss": float})
        events = pd.DataFrame(list(status.events))
        return (
            _status_html(status),
            losses,
            gr.update(value=events, visible=bool(status.events)),
            status.to_dict(),
            gr.update(interactive=not status.running),
            gr.update(interactive=status.running and status.state != "stopping"),
        )

    # -- Compare tab

    def compare(self, runs: list[str] | None, prompts: str = "", seeds: str = "0", steps: float | None = None) -> tuple:
        """Base and the chosen runs on the same prompts and seeds: a slider for two columns, a gallery for all."""
        run_dirs = [self._run(name) for name in runs or []]
        try:
            seed_list = [int(s) for s in seeds.replace(",", " ").split()] or [0]
        except ValueError as e:
            raise gr.Error(f"seeds must be whole numbers, got {seeds!r}") from e
        prompt_list = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        base = None if run_dirs else TrainConfig().base
        try:
            result, grid = jobs.compare_runs(run_dirs, self.output_dir / jobs.COMPARE_DIR, prompt_list, seed_list,
                                       int(steps) if steps else None, base=base)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        cells = [(image, f"{title} | {label}") for label, images in result.rows
                 for title, image in zip(result.titles, images, strict=True)]
        slider = gr.update(value=None, visible=False)
        if len(result.titles) == 2:  # base and one run: the first prompt and seed under a slider
            label, (left, right) = result.rows[0]
            slider = gr.update(value=(left, right), visible=True, label=" | ".join(result.titles) + f": {label}")
        return slider, cells, self._hand_out(grid)

    def _run(self, name: str | None) -> Path:
        try:
            return jobs.resolve_run(self.output_dir, name or "")
        except ValueError as e:
            raise gr.Error(str(e)) from e

    def _hand_out(self, path: Path) -> str:
        """Return a copy of `path` (a hard link where possible) in the page's own folder, which is served: files in
        the runs and datasets themselves never are."""
        folder = self.output_dir / GUI_CACHE_DIR / HANDED_OUT_DIR / uuid.uuid4().hex
        folder.mkdir(parents=True)
        copy = folder / path.name
        try:
            os.link(path, copy)
        except OSError:
            shutil.copyfile(path, copy)
        return str(copy)

    # -- Evaluate tab

    def score_table(self) -> pd.DataFrame:
        """One row per evaluated run: its CMMD, the base model's, and how far the score can be trusted."""
        rows = []
        for run in jobs.list_runs(self.output_dir):
            if run.cmmd:
                c = run.cmmd
                note = score_note(c["clip_model"], c["trustworthy"])
                rows.append([run.name, run.method, round(c["cmmd"], 4), _round(c.get("base_cmmd")), c["n_images"],
                             c["clip_model"], note])
        return pd.DataFrame(rows, columns=["run", "method", "CMMD", "base CMMD", "images", "CLIP", "note"])

    def evaluate(self, runs: list[str] | None, clip: str = "reference", clip_checkpoint: str | None = None,
                 steps: float | None = None, limit: float | None = None, base_too: bool = False,
                 progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 - how gradio injects a tracker
        """CMMD of each chosen run (op-lora.txt Sec. 4.1 protocol); returns the score table and a message."""
        if not runs:
            raise gr.Error("choose at least one finished run")
        run_dirs = [self._run(name) for name in runs]
        try:
            embedder = jobs.cached_embedder(DEMO_CLIP if clip == DEMO_CLIP else None, clip_checkpoint or None)
        except (ClipWeightsMissing, ValueError) as e:
            raise gr.Error(str(e)) from e
        warnings = set()
        for run_dir in progress.tqdm(run_dirs, desc="evaluating"):
            try:
                result = evaluate_run(EvalConfig(run_dir, steps=int(steps) if steps else None,
                                                 limit=int(limit) if limit else None, base_too=base_too), embedder)
            except (ValueError, FileNotFoundError) as e:
                raise gr.Error(f"{run_dir.name}: {e}") from e
            warnings.add(result.get("warning", ""))
        message = [f"Scored {len(run_dirs)} run(s) with CLIP {embedder.model_name}.", trust_label(embedder), *warnings]
        return self.score_table(), " ".join(m for m in message if m)

    # -- Export tab

    def export_lora(self, run: str | None, fmt: str = "diffusers", dtype: str = EXPORT_DEFAULTS.dtype) -> tuple:
        """Collapse the run's adapter into LoRA file(s) in the chosen format; return them and a note naming the
        programs each file is for, with a diffusers loading snippet."""
        run_dir = self._run(run)
        if dtype not in DTYPE_NAMES:
            raise gr.Error(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        # Named after the run, so downloads from several runs do not overwrite each other; every kind but the
        # diffusers one gets its suffix (`_kohya`, `_lycoris`, `_comfyui`, `_a1111`).
        # A stopped run's files say partial, as its own do.
        stem = run_dir.name + RunDir(run_dir).partial_tag() + DTYPE_SUFFIXES[DTYPE_NAMES[dtype]]
        name = run_dir / f"{stem}.safetensors"
        try:
            files = export(run_dir, name, DTYPE_NAMES[dtype], format=fmt, suffixed=True)
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e
        notes = "".join(f"# {path.name}: {purpose(path)}\n" for path in files.values())
        snippet = jobs.load_snippet(run_dir, files["diffusers"]) if "diffusers" in files else ""
        return [self._hand_out(f) for f in files.values()], notes + ("\n" + snippet if snippet else "")


def _thumbnail(path: Path) -> Image.Image:
    """A small RGB copy of an image for the page: the gallery then serves its own files from the output folder
    (never the dataset's, wherever it lies) and sends kilobytes, not full-size photos."""
    with Image.open(path) as im:
        small = ImageOps.exif_transpose(im).convert("RGB")
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return small


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _status_html(status: jobs.JobStatus) -> str:
    """One line and a progress bar for the training job."""
    if status.state == "idle":
        return "<p id='job-status'>No run started since the server started. Pick settings and press Start.</p>"
    run = html.escape(status.run_dir.name if status.run_dir else "")
    parts = [f"<b>{status.state}</b> <code>{run}</code>"]
    if status.total:
        parts.append(f"step {status.step} / {status.total}")
    if status.loss is not None:
        parts.append(f"loss {status.loss:.4f}")
    if status.it_s:
        parts.append(f"{status.it_s:.1f} it/s")
    if status.running and status.step:
        parts.append(f"ETA {_duration(status.eta_s)}")
    line = " &middot; ".join(parts)
    if status.state == "starting":
        line += " &middot; loading the model and encoding the images"
    if status.error:
        line += f"<br><span style='color:#c00'>{html.escape(status.error)}</span>"
    bar = f"<progress value='{status.step}' max='{max(status.total, 1)}' style='width:100%'></progress>"
    return f"<div id='job-status'>{line}{bar}</div>"


def build_app(output_dir: Path, max_upload_bytes: int) -> gr.Blocks:
    """Return the Blocks of the GUI over the runs in `output_dir` (not launched)."""
    app = App(output_dir)
    with gr.Blocks(title="opdiff", analytics_enabled=False) as demo:
        gr.Markdown("# opdiff\nPersonalize Stable Diffusion XL with over-parameterized low-rank adapters; "
                    "download a plain LoRA.")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset") as dataset_tab:
                gr.Markdown("Upload images with same-name `.txt` captions (or a `metadata.jsonl`), or a `.zip` of "
                            f"either; at most {max_upload_bytes / 2**20:.3g} MB per file.")
                upload = gr.File(file_count="multiple", label="Images, captions or a .zip", elem_id="upload",
                                 file_types=[".png", ".jpg", ".jpeg", ".webp", ".txt", ".jsonl", ".zip"])
                dataset_message = gr.Markdown(elem_id="dataset-message")
                with gr.Row():
                    view_dataset = gr.Dropdown(label="Dataset", allow_custom_value=True, scale=4, elem_id="view-dataset",
                                               info="Uploads are kept in the output folder; pick one to view it.")
                    save_button = gr.Button("Save captions", scale=1)
                gallery = gr.Gallery(label="Images", columns=8, height=260, elem_id="thumbnails")
                captions = gr.Dataframe(headers=["file", "caption"], type="array", interactive=True,
                                        static_columns=[0], label="Captions (editable)", elem_id="captions")
                rejected = gr.Dataframe(headers=["file", "reason"], type="array", interactive=False,
                                        label="Rejected files", elem_id="rejected")

            with gr.Tab("Train", id="train") as train_tab:
                form: dict[str, gr.components.Component] = {}
                shown, settings = form_spec(TrainConfig().method), form_settings()
                for group in GROUPS:
                    members = [s for s in settings if s.group == group]
                    if not members:
                        continue
                    title = GROUP_TITLES.get(group)
                    with gr.Accordion(title, open=False) if title else gr.Group():
                        with gr.Row():
                            for s in members:
                                visible = s.name in shown.get(group, [])
                                if s.name == "data":  # the dataset picker: uploads and the bundled images
                                    form["data"] = gr.Dropdown(label=s.title, info=_info(s), allow_custom_value=True,
                                                               elem_id="field-data")
                                else:
                                    form[s.name] = _widget(s, visible)
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="start")
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                with gr.Accordion("Continue a stopped run", open=False):
                    with gr.Row():
                        resume_run = gr.Dropdown(label="Run", allow_custom_value=True, scale=3, elem_id="resume-run")
                        resume_steps = gr.Number(None, label="max_steps", precision=0,
                                                 info="Train up to this many steps in all; empty or 0: the run's own.")
                        resume = gr.Button("Resume", elem_id="resume")
                status_html = gr.HTML(_status_html(jobs.JobStatus()))
                loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260, elem_id="loss-plot")
                selections = gr.Dataframe(label="What the method did", visible=False, interactive=False,
                                          elem_id="method-events")
                with gr.Accordion("Raw status", open=False):
                    job = gr.JSON(label="job")
                timer = gr.Timer(POLL_SECONDS)

            with gr.Tab("Compare", id="compare") as compare_tab:
                gr.Markdown("The base model and each chosen run's exported LoRA, on the same prompts, seeds and "
                            "initial noise. Choose no run to see the base alone.")
                with gr.Row():
                    compare_runs = gr.Dropdown(label="Runs", multiselect=True, allow_custom_value=True, scale=3,
                                               elem_id="compare-runs")
                    compare_steps = gr.Number(None, label="Denoising steps", precision=0, elem_id="compare-steps",
                                              info="Empty or 0: the run's sample_steps.")
                compare_prompts = gr.Textbox(label="Prompts", lines=2, info="One per line; empty: the first run's "
                                             "sample prompts.", elem_id="compare-prompts")
                compare_seeds = gr.Textbox("0", label="Seeds", info="Space-separated; each prompt once per seed.")
                compare_button = gr.Button("Render", variant="primary", elem_id="render")
                slider = gr.ImageSlider(label="base | run", type="pil", format="png", visible=False, elem_id="slider")
                compare_gallery = gr.Gallery(label="All images", columns=4, height="auto", format="png")
                grid_file = gr.File(label="Grid (PNG)")

            with gr.Tab("Evaluate", id="evaluate") as evaluate_tab:
                gr.Markdown("CMMD (lower is closer) between one generated image per training caption and the "
                            "training images (op-lora.txt Sec. 4.1), with CLIP ViT-L/14 at 336 px.")
                eval_runs = gr.Dropdown(label="Runs", multiselect=True, allow_custom_value=True, elem_id="eval-runs")
                with gr.Row():
                    clip = gr.Radio([("CLIP ViT-L/14-336 (reference)", "reference"),
                                     ("bundled demo CLIP (offline; ranks demo runs, not comparable to published "
                                      "CMMD)", DEMO_CLIP)],
                                    value="reference", label="CLIP", elem_id="clip")
                    clip_checkpoint = gr.Textbox(label="CLIP weights file", info="Empty: the open_clip / Hugging "
                                                 "Face cache. Needed once for the reference model when offline.")
                with gr.Row():
                    eval_steps = gr.Number(None, label="Denoising steps", precision=0, elem_id="eval-steps",
                                           info="Empty or 0: the run's sample_steps.")
                    eval_limit = gr.Number(None, label="Captions", precision=0, elem_id="eval-limit",
                                           info="Generate for the first N captions only; empty or 0: all.")
                    base_too = gr.Checkbox(label="Score the base model too")
                eval_button = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
                eval_message = gr.Markdown()
                scores = gr.Dataframe(label="Scores", interactive=False, elem_id="scores")

            with gr.Tab("Export", id="export") as export_tab:
                gr.Markdown("The adapter collapsed into LoRA files, each for the programs named in the note below "
                            "and in its header. `diffusers`: for `pipe.load_lora_weights`. `kohya`: a LoRA method "
                            "gets one file for ComfyUI (`models/loras`), AUTOMATIC1111/Forge (`models/Lora`) and "
                            "sd-scripts; a DoRA method gets three, since these programs compute DoRA differently: "
                            "`_lycoris` (LyCORIS, sd-scripts with LyCORIS), `_comfyui` (ComfyUI and Forge as they "
                            "are now) and `_a1111` (AUTOMATIC1111 and programs without DoRA: a plain LoRA close to "
                            "the DoRA, its error in the note). `both`: all of them.")
                with gr.Row():
                    export_run = gr.Dropdown(label="Run", allow_custom_value=True, scale=3, elem_id="export-run")
                    fmt = gr.Radio(list(FORMATS), value="diffusers", label="Format")
                    dtype = gr.Radio(list(DTYPES), value=EXPORT_DEFAULTS.dtype, label="dtype")
                export_button = gr.Button("Export", variant="primary", elem_id="export")
                export_files = gr.File(label="LoRA file(s)", file_count="multiple", elem_id="export-files")
                snippet = gr.Code(language="python", label="Which file is for which program; loading in diffusers")

        dataset_outputs = [gallery, captions, rejected, dataset_message]
        upload.upload(app.upload_dataset, upload, [form["data"], view_dataset, *dataset_outputs],
                      api_name="upload_dataset")
        view_dataset.input(app.show_dataset, view_dataset, dataset_outputs, api_name="show_dataset")
        save_button.click(app.save_captions, [view_dataset, captions], dataset_outputs, api_name="save_captions")

        method_widgets = [form[s.name] for s in form_settings() if s.read_by is not None]
        form["method"].change(app.method_changed, form["method"], method_widgets, api_name="method_changed")
        status_outputs = [status_html, loss_plot, selections, job, start, stop]
        start.click(_keyword_handler(app.start_training, form), inputs_kwargs=form, outputs=status_outputs, api_name="start_training")
        stop.click(app.stop_training, outputs=status_outputs, api_name="stop_training")
        resume.click(app.resume_training, [resume_run, resume_steps], status_outputs, api_name="resume_training")
        timer.tick(app.poll, outputs=status_outputs, api_name="status", show_progress="hidden")

        compare_button.click(app.compare, [compare_runs, compare_prompts, compare_seeds, compare_steps],
                             [slider, compare_gallery, grid_file], api_name="compare")
        eval_button.click(app.evaluate, [eval_runs, clip, clip_checkpoint, eval_steps, eval_limit, base_too],
                          [scores, eval_message], api_name="evaluate")
        export_button.click(app.export_lora, [export_run, fmt, dtype], [export_files, snippet], api_name="export")

        list_inputs = [form["data"], compare_runs, eval_runs, export_run, resume_run]
        lists = [form["data"], view_dataset, *list_inputs[1:], scores]
        demo.load(app.refresh, list_inputs, lists, api_name="refresh").then(
            app.show_dataset, view_dataset, dataset_outputs, api_name="show_dataset_on_load")
        demo.load(app.poll, outputs=status_outputs, api_name="status_on_load")
        for tab in (dataset_tab, train_tab, compare_tab, evaluate_tab, export_tab):
            tab.select(app.refresh, list_inputs, lists, api_name=f"refresh_{tab.id}")
    return demo


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """Return (user, password) from `USER:PASSWORD`; None for an empty value. Raises ValueError for a bad one."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise ValueError(f"a login must be USER:PASSWORD (--auth or {AUTH_ENV}), got {value.split(':')[0]!r}...")
    return user, password


def exposure_warning(host: str, auth: tuple[str, str] | None) -> str | None:
    """Return a warning when the GUI would listen beyond this machine (not a loopback address) without a login."""
    if auth is not None:
        return None
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name other than localhost: reachable from elsewhere
        pass
    return (f"WARNING: serving on {host} without a login: anyone who reaches this port can train on this machine, "
            "see its runs and download its LoRA files. Set a login with --auth USER:PASSWORD or the environment "
            f"variable {AUTH_ENV}=USER:PASSWORD, or bind 127.0.0.1.")


def serve(output_dir: str | Path = "runs", host: str = "127.0.0.1", port: int | None = None,
          max_upload_mb: float = 500, block: bool = True, auth: tuple[str, str] | None = None) -> gr.Blocks:
    """Build and launch the GUI; return the running Blocks (with `block=False`, at once, serving in a thread).

    Uploads and every file the page shows live under `output_dir`; only what the page handed out is served
    from it (never the runs or datasets themselves). Uploads over `max_upload_mb` are refused. `auth` (user,
    password) asks for a login; without one, a host beyond loopback gets a warning on stderr (`exposure_warning`).
    """
    if warning := exposure_warning(host, auth):
        print(warning, file=sys.stderr)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    # gradio keeps uploads and the files it serves in GRADIO_TEMP_DIR; read when components are built.
    os.environ["GRADIO_TEMP_DIR"] = str(output_dir / GUI_CACHE_DIR)
    max_upload_bytes = int(max_upload_mb * 2**20)
    demo = build_app(output_dir, max_upload_bytes)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=False, max_file_size=max_upload_bytes, auth=auth,
                prevent_thread_lock=not block, quiet=not block, show_error=True, footer_links=["api"])
    return demo


def build_parser(prog: str = "app.py") -> argparse.ArgumentParser:
    """Return the GUI's argument parser (`python app.py` and `opdiff-app` share it)."""
    parser = argparse.ArgumentParser(prog=prog, description="Start the opdiff web GUI.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 0.0.0.0 exposes the GUI (and training on this machine) to the network")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"),
                        help="folder for runs, uploaded datasets and exports; the only folder files are served from")
    parser.add_argument("--max-upload-mb", type=float, default=500, help="largest file the page accepts, in MB")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help=f"ask for this login before anything is shown or served (default: ${AUTH_ENV}, else no "
                        "login); set it whenever --host is not 127.0.0.1")
    return parser


def main(argv: list[str] | None = None, prog: str = "app.py") -> int:
    """Parse the flags and serve the GUI until interrupted; return the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV))
    except ValueError as e:
        parser.error(str(e))
    serve(args.output_dir, args.host, args.port, args.max_upload_mb, auth=auth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
