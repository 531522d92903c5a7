"""opdiff in the browser: a studio in three steps. 1. Dataset: named image sets with captions. 2. Train: a preset,
a method, its settings, and the run's progress, loss and samples as they arrive. 3. Results: the runs, a labelled
comparison grid, CMMD scores and the LoRA files with how to use them.

    python app.py [--host 127.0.0.1] [--port 7860] [--output-dir runs] [--max-upload-mb 500]    (or: opdiff-app ...)

Without --host / --port, GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are honoured (as Gradio, containers and Spaces set
them), else 127.0.0.1:7860.

A thin shell over `pipelines`: widgets and glue only. Training runs in `pipelines.jobs.TrainingJobs`, a
background worker the page polls, so closing or reloading the page neither stops nor loses a run (a reload
restores the form from the running run's settings). Every event handler has an `api_name`, so `gradio_client`
drives the app exactly as the page does.
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
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import typing  # noqa: E402
import uuid  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from opdiff.methods import METHODS  # noqa: E402
from opdiff.settings import GROUPS, Setting  # noqa: E402
from pipelines import jobs  # noqa: E402
from pipelines.config import BUNDLED_DATA, TrainConfig, resume_config  # noqa: E402
from pipelines.evaluate import (  # noqa: E402
    DEMO_CLIP,
    REFERENCE_MODEL,
    ClipWeightsMissing,
    EvalConfig,
    clip_availability,
    evaluate_run,
    score_note,
)
from pipelines.export import DTYPE_NAMES, DTYPE_SUFFIXES, DTYPES, FORMATS, ExportConfig, export  # noqa: E402
from pipelines.rundir import RunDir  # noqa: E402

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
EXPORT_DEFAULTS = ExportConfig(Path("."))
"""The export settings' defaults (the command line's too)."""
GUI_CACHE_DIR = ".gradio"
"""Sub-folder of the output folder for uploads and the files the page shows: nothing is served from elsewhere (the
runs and datasets beside it are not served at all; a file the page offers is handed out as a copy in here)."""
HANDED_OUT_DIR = "handed-out"
"""Sub-folder of GUI_CACHE_DIR holding the files offered for viewing and download, one folder per offer."""
AUTH_ENV = "OPDIFF_APP_AUTH"
"""Environment variable with the login, USER:PASSWORD (read when --auth is not given)."""
CACHE_DIR = "cache"
"""Sub-folder of the output folder where runs keep image latents and caption embeddings for later runs."""
POLL_SECONDS = 1.0
THUMBNAIL_PX = 256
THUMBNAIL_COLUMNS = 8
THUMBNAIL_ROW_PX = 150
"""Height of a row of thumbnails on the page, for the gallery's height (up to three rows, then it scrolls)."""
SAMPLES_SHOWN = 24
"""The newest samples of a run the Train tab shows."""
SAMPLES_EMPTY = "Samples: none yet (images sampled while training appear here)"
NEW_DATASET_NAME = "My images"
"""The name of a dataset made by uploading while the bundled demo images are on view."""
BUNDLED_LABEL = "Bundled demo images (read-only)"
CANCELLED = "__cancelled__"
"""What a delete button sends when its confirmation dialog is cancelled."""
METHOD = "method"
"""The setting that chooses the adapter method: the form shows its paragraph and its own settings beside it."""
FORM_EXCLUDED = ("output_dir", "resume", "preset", "overwrite")
"""Settings the form leaves out: the app chooses the run folder; continuing a run is an action in Results; the
preset picker above the form fills the form rather than being one of its fields."""

GROUP_TITLES = {"run": "What to train on", "basic": "Main settings", "data": "Captions and images",
                "optimization": "Schedule, accumulation and loss",
                "sampling": "Sample images", "advanced": "Advanced: memory, speed, devices"}
OPEN_GROUPS = ("run", "basic")
"""Groups shown open; the others are folded."""
CMMD_HOW_TO_READ = ("CMMD measures how far generated images are from your training images as CLIP sees them: "
                    "lower is closer, and a negative difference to the base means the LoRA moved the model toward "
                    "your images.")

CSS = """
.settings { gap: 12px; }
.settings > *, .settings .form > .block { min-width: min(240px, 100%) !important; }
.settings .form > .block.choice-help { flex-basis: 100% !important; }
.actions { align-items: flex-end; gap: 12px; }
.actions > button { flex-grow: 0 !important; min-width: max-content !important; white-space: nowrap; }
.ref { color: var(--body-text-color-subdued); font-size: var(--text-sm); }
#compare-grid table { border-collapse: collapse; width: auto; }
#compare-grid th, #compare-grid td { padding: 4px; vertical-align: top; text-align: left;
                                     border: 1px solid var(--border-color-primary); }
#compare-grid th { font-weight: 600; max-width: 260px; overflow-wrap: anywhere; }
#compare-grid td { width: 192px; }
#compare-grid img { width: 192px; max-width: none; height: auto; margin: 0; image-rendering: pixelated;
                    display: block; }
#compare-grid .scroll { overflow-x: auto; }
#slider img { object-fit: contain; }
"""
THEME = gr.themes.Default().set(body_text_color_subdued="*neutral_600", block_info_text_color="*neutral_600",
                                body_text_color_subdued_dark="*neutral_400",
                                block_info_text_color_dark="*neutral_400")
"""Gradio's default look with darker help lines and source notes: its pale grey reads below 4.5:1 on white."""


# ---------------------------------------------------------------------------------------------------------------
# The training form, generated from the settings' descriptions


def form_settings() -> list[Setting]:
    """The training form's settings: TrainConfig's, read from the registry now (a method registered at run time
    brings its own), without the run folder, which the app chooses."""
    return [s for s in TrainConfig.settings() if s.name not in FORM_EXCLUDED]


def form_spec(method: str) -> dict[str, list[str]]:
    """The training form for `method`: {group: names of the settings shown}, in the order shown.

    Built from TrainConfig's settings (`opdiff.settings.Setting`): one widget per setting, laid out by group; a
    method's own settings are shown only while a method that reads them is chosen.
    """
    spec: dict[str, list[str]] = {}
    for s in form_settings():
        if s.applies_to(method):
            spec.setdefault(s.group, []).append(s.name)
    return spec


def _info(s: Setting) -> str:
    """A widget's help line: plain help, then what an empty box means, then the source (a second line)."""
    text = s.help
    if s.optional and s.none_means:
        text += f" Empty: {s.none_means}."
    return text + (f"\nSource: {s.ref}" if s.ref else "")


def _label(s: Setting) -> str:
    return s.title[:1].upper() + s.title[1:]


def _choice_labels(s: Setting) -> list[str]:
    """A choice's label: its help line, which names the choice, or `choice: help`."""
    if not s.choice_help:
        return [str(c) for c in s.allowed or ()]
    return [h if h.casefold().startswith(f"{c}:".casefold()) else f"{c}: {h}"
            for c, h in zip(s.allowed, s.choice_help, strict=True)]


def _widget(s: Setting, visible: bool = True) -> gr.components.Component:
    """The form widget for one setting, typed from its description."""
    common = {"label": _label(s), "info": _info(s), "elem_id": f"field-{s.name}", "visible": visible,
              "min_width": 240}
    if s.base_type is bool:
        return gr.Checkbox(s.default, **common)
    if s.picks == "run":  # the finished runs to pick from arrive with `App.scoring_runs`; any path may be typed
        return gr.Dropdown([], value=_shown(s, s.default) or None, allow_custom_value=True, **common)
    if s.allowed is not None:  # a choice with a help line takes a whole row, so the chosen line shows uncut
        return gr.Dropdown(list(zip(_choice_labels(s), s.allowed, strict=True)), value=s.default,
                           elem_classes=["choice-help"] if s.choice_help else None, **common)
    if s.is_list:
        return gr.Textbox(_shown(s, s.default), lines=2, **{**common, "info": common["info"] + " One per line."})
    if s.item_type in (int, float):
        return gr.Number(s.default, precision=0 if s.item_type is int else None, placeholder=_placeholder(s),
                         **common)
    return gr.Textbox(_shown(s, s.default), **common)


def _placeholder(s: Setting) -> str | None:
    """What an optional box shows while empty (gradio shows 0 in an empty number box that has no placeholder)."""
    return "empty" if s.optional else None


def _shown(s: Setting, value: object) -> object:
    """A setting's value as its widget holds it (a list one item per line; an empty optional box for None)."""
    if s.is_list:
        return "\n".join(map(str, value or ()))
    if value is None:
        return None if s.item_type in (int, float) else ""
    return str(value) if s.item_type not in (bool, int, float) and s.allowed is None else value


def _means_empty(s: Setting, value: object) -> bool:
    """Whether a number box's `value` stands for an empty box: 0 in an optional box where 0 is not allowed (gradio
    puts 0 in an empty number box when it first draws it; API callers may send 0 too)."""
    if not (s.optional and s.item_type in (int, float) and s.allowed is None and value == 0):
        return False
    try:
        s.check(0)
    except ValueError:
        return True
    return False


def _optional_numbers() -> list[Setting]:
    """The form's optional number settings: their boxes are emptied where gradio drew them with a 0."""
    return [s for s in form_settings() if s.optional and s.item_type in (int, float) and s.allowed is None
            and not s.is_list]


def _emptied(*values: object) -> list:
    """Updates for the optional number boxes (`_optional_numbers` order): an empty box, or a 0 that stands for
    empty, is sent an explicit empty value (gradio draws a box never sent one with a 0); a box holding a value is
    left alone (sending it back could undo what a person typed meanwhile)."""
    return [gr.update(value=None) if v is None or _means_empty(s, v) else gr.update()
            for s, v in zip(_optional_numbers(), values, strict=True)]


def _run_pickers() -> list[Setting]:
    """The form's settings picked from the output folder's runs (`Setting.picks == "run"`)."""
    return [s for s in form_settings() if s.picks == "run"]


def _zero_is_empty(*values: float | None) -> list:
    """Step and image-count boxes outside the form, where 0 never means anything: a 0 gradio drew is emptied, the
    others left alone."""
    return [gr.update(value=None) if v is None or v == 0 else gr.update() for v in values]


def _config_from_form(values: dict) -> TrainConfig:
    """Turn the form's values into a TrainConfig; an empty box of an optional setting (None), or a 0 where 0 is
    not allowed, means its default."""
    settings = {s.name: s for s in TrainConfig.settings()}
    clean = {name: None if _means_empty(settings[name], value) else value for name, value in values.items()}
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


def _method_note(method: str | None) -> str:
    """The chosen method's paragraph (what it does, what it costs) and its source in a second, quieter line."""
    if not method:
        return ""
    about, ref = jobs.method_about(method)
    return f"{about}" + (f"\n\n<span class='ref'>Source: {html.escape(ref)}</span>" if ref else "")


# ---------------------------------------------------------------------------------------------------------------
# The handlers


class App:
    """The handlers, bound to one output folder and one training worker."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.datasets_dir = output_dir / jobs.DATASETS_DIR
        self.jobs = jobs.TrainingJobs(output_dir)

    # -- lists the page refreshes on load and on tab changes

    def dataset_choices(self) -> list[tuple[str, str]]:
        """(label, folder) of every dataset training may use: the named ones, newest first, then the bundled demo."""
        named = [(f"{d.name} ({d.images} images)", str(d.path)) for d in jobs.list_datasets(self.datasets_dir)]
        return named + [(BUNDLED_LABEL, str(BUNDLED_DATA))]

    def _run_choices(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(every run, the runs with a LoRA file) as (label, name) choices."""
        runs = jobs.list_runs(self.output_dir, self.jobs.training_dir())
        every = [(f"{r.name} ({r.method}, {r.state})", r.name) for r in runs]
        return every, [(f"{r.name} ({r.method}, {r.steps} steps)", r.name) for r in runs if r.exported]

    def scoring_runs(self) -> dict:
        """The update of a run picker of the form (`Setting.picks == "run"`): the finished runs whose file is a
        plain LoRA (not DoRA), by folder, newest first."""
        runs = [r for r in jobs.list_runs(self.output_dir, self.jobs.training_dir())
                if r.state == "finished" and r.method in METHODS and not METHODS[r.method].use_dora]
        choices = [(f"{r.path.name} ({r.method}, {r.steps} steps)", str(r.path)) for r in runs]
        return gr.update(choices=choices)

    def refresh(self, dataset: str | None = None, compare_runs: list[str] | None = None,
                eval_runs: list[str] | None = None, export_run: str | None = None,
                run: str | None = None) -> tuple:
        """Page load and tab changes: fresh dataset and run lists (keeping valid selections), the runs table and
        the score table.

        Returns updates for the dataset on view, the training dataset, the compare, evaluate and export run
        pickers, the runs list's run picker, the runs table, the score table and the chosen run's paragraph."""
        datasets = self.dataset_choices()
        every, exported = self._run_choices()
        names = {value for _, value in exported}
        dataset = dataset if dataset in {v for _, v in datasets} else datasets[0][1]
        run = run if run in {v for _, v in every} else next(iter(v for _, v in every), None)
        return (
            gr.update(choices=datasets, value=dataset),
            gr.update(choices=datasets, value=dataset),
            gr.update(choices=exported, value=[r for r in compare_runs or [] if r in names]),
            gr.update(choices=exported, value=[r for r in eval_runs or [] if r in names]),
            gr.update(choices=exported, value=export_run if export_run in names else (exported[0][1] if exported
                                                                                      else None)),
            gr.update(choices=every, value=run),
            self.runs_table(),
            self.score_table(),
            self.describe_run(run),
        )

    def _dataset_path(self, value: str | None) -> Path:
        """The dataset folder a page/API value names (its folder or its name): the bundled demo or a named
        dataset, nothing else."""
        if not value or Path(value).resolve() == BUNDLED_DATA.resolve() or value == BUNDLED_LABEL:
            return BUNDLED_DATA.resolve()
        try:
            return jobs.find_dataset(self.datasets_dir, value)
        except ValueError as e:
            raise gr.Error(str(e)) from e

    def _writable(self, path: Path) -> Path:
        if path == BUNDLED_DATA.resolve():
            raise gr.Error("the bundled demo images are read-only; create a dataset of your own first")
        return path

    # -- 1. Dataset

    def _dataset_outputs(self, view: jobs.DatasetView, message: str = "") -> tuple:
        """Updates for the dataset on view: gallery, captions table, refused files, message, image picker, the
        next-step button and the refused files' fold (open when there are any)."""
        rows = min(3, math.ceil(len(view.rows) / THUMBNAIL_COLUMNS)) or 1  # then it scrolls
        gallery = gr.update(value=[(_thumbnail(p), caption or "(no caption)") for p, caption in view.rows],
                            height=rows * THUMBNAIL_ROW_PX + 40)
        table = [[p.name, caption] for p, caption in view.rows]
        name = BUNDLED_LABEL if view.root == BUNDLED_DATA.resolve() else view.name
        summary = f"**{html.escape(name)}**: {len(view.rows)} image(s)."
        if not view.rows:
            summary += " Add images with the box above."
        if view.uncaptioned:
            summary += f" {view.uncaptioned} image(s) have no caption yet: pick one below or edit the table."
        notes = "".join(f"\n- `{html.escape(n)}`: {html.escape(note)}" for n, note in view.notes)
        text = "\n\n".join(part for part in (message, summary) if part) + (f"\n\nNotices:{notes}" if notes else "")
        names = [p.name for p, _ in view.rows]
        return (gallery, table, [list(r) for r in view.skipped] or None, text,
                gr.update(choices=names, value=names[0] if names else None),
                gr.update(visible=bool(view.rows)), gr.update(open=bool(view.skipped)))

    def _open(self, path: Path) -> jobs.DatasetView:
        try:
            return jobs.open_dataset(path)
        except ValueError as e:
            raise gr.Error(str(e)) from e

    def _picked(self, path: Path) -> tuple:
        """The dataset pickers of both steps, on `path` with fresh choices (one update each: gradio consumes an
        update while applying it)."""
        choices = self.dataset_choices()
        return gr.update(choices=choices, value=str(path)), gr.update(choices=choices, value=str(path))

    def show_dataset(self, dataset: str | None = None) -> tuple:
        """Thumbnails, captions and refused files of the chosen dataset."""
        return self._dataset_outputs(self._open(self._dataset_path(dataset)))

    def create_dataset(self, name: str | None) -> tuple:
        """Create an empty dataset named `name` and put it on view (for both steps)."""
        try:
            path = jobs.create_dataset(self.datasets_dir, name or "")
        except ValueError as e:
            raise gr.Error(str(e)) from e
        view = self._open(path)
        return (*self._picked(path), "", *self._dataset_outputs(view, f"Created **{html.escape(view.name)}**."))

    def add_files(self, dataset: str | None, files: list[str] | None, name: str | None = None) -> tuple:
        """Add uploaded images, captions or zips to the dataset on view (the bundled demo being read-only, to a
        new dataset named `name`); clear the upload box, show the dataset and what was refused and why."""
        if not files:
            raise gr.Error("choose images (with .txt captions) or a .zip first")
        path = self._dataset_path(dataset)
        created = path == BUNDLED_DATA.resolve()
        if created:
            path = jobs.create_dataset(self.datasets_dir, (name or "").strip() or self._free_name())
        try:
            view = jobs.add_files(path, files)
        except jobs.UploadRejected as e:
            gr.Warning(str(e))
            if created:  # no empty dataset is left behind
                jobs.delete_dataset(path)
                path = BUNDLED_DATA.resolve()
            message = "**Nothing was added.** The files and the reasons are listed under *Files not used*."
            view = replace(self._open(path), skipped=e.skipped)
            return (*self._picked(path), None, *self._dataset_outputs(view, message))
        message = f"Added {view.added} image(s)."
        if view.skipped:
            message += f" {len(view.skipped)} file(s) were not used: see *Files not used* below."
            gr.Warning(f"{len(view.skipped)} uploaded file(s) not used; the reasons are listed under the images")
        return (*self._picked(path), None, *self._dataset_outputs(view, message))

    def _free_name(self) -> str:
        taken = {d.name.casefold() for d in jobs.list_datasets(self.datasets_dir)}
        return next(name for k in range(1, 1000)
                    if (name := NEW_DATASET_NAME + ("" if k == 1 else f" {k}")).casefold() not in taken)

    def rename_dataset(self, dataset: str | None, name: str | None) -> tuple:
        """Give the dataset on view a new name (runs that trained on it keep finding it)."""
        path = self._writable(self._dataset_path(dataset))
        try:
            jobs.rename_dataset(path, name or "")
        except ValueError as e:
            raise gr.Error(str(e)) from e
        return (*self._picked(path), "", *self._dataset_outputs(self._open(path), "Renamed."))

    def delete_dataset(self, dataset: str | None) -> tuple:
        """Delete the dataset on view with its images; refused while a run trains on it."""
        if dataset == CANCELLED:
            return tuple(gr.update() for _ in range(9))
        path = self._writable(self._dataset_path(dataset))
        status = self.jobs.status()
        in_use = Path(status.settings["data"]) if status.running and status.settings else None
        name = jobs.dataset_name(path)
        try:
            jobs.delete_dataset(path, in_use)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        following = Path(self.dataset_choices()[0][1])
        return (*self._picked(following), *self._dataset_outputs(self._open(following),
                                                                  f"Deleted **{html.escape(name)}**."))

    def remove_images(self, dataset: str | None, names: list[str] | str | None) -> tuple:
        """Remove images (and their captions) from the dataset on view."""
        path = self._writable(self._dataset_path(dataset))
        names = [names] if isinstance(names, str) else list(names or [])
        if not names:
            raise gr.Error("choose an image to remove")
        try:
            view = jobs.remove_images(path, names)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        return self._dataset_outputs(view, f"Removed {', '.join(names)}.")

    def save_captions(self, dataset: str | None, table: list[list[str]] | None) -> tuple:
        """Write the captions edited in the table next to the images."""
        return self._save(dataset, [(row[0], row[1]) for row in table or [] if row and row[0]], "Captions saved.")

    def save_caption(self, dataset: str | None, image: str | None, caption: str | None) -> tuple:
        """Write one image's caption."""
        if not image:
            raise gr.Error("choose an image first")
        return self._save(dataset, [(image, caption or "")], f"Caption of {image} saved.")

    def _save(self, dataset: str | None, captions: list[tuple[str, str]], message: str) -> tuple:
        path = self._writable(self._dataset_path(dataset))
        try:
            view = jobs.save_captions(path, captions)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        return self._dataset_outputs(view, message)

    def pick_image(self, dataset: str | None, image: str | None) -> str:
        """The caption of the image chosen for editing."""
        if not image:
            return ""
        captions = {p.name: caption for p, caption in self._open(self._dataset_path(dataset)).rows}
        if image not in captions:
            raise gr.Error(f"{image!r} is not an image of this dataset")
        return captions[image]

    # -- 2. Train

    def presets(self) -> tuple:
        """The preset picker: its choices, hidden while there are none."""
        names = [p.name for p in jobs.list_presets()]
        return gr.update(choices=names, value=None, visible=bool(names)), gr.update(value="", visible=bool(names))

    def apply_preset(self, name: str | None) -> list:
        """Fill the form from preset `name` (its settings over the defaults) and describe it."""
        if not name:
            return [gr.update() for _ in form_settings()] + [gr.update(), gr.update()]
        presets = {p.name: p for p in jobs.list_presets()}
        if name not in presets:
            raise gr.Error(f"unknown preset {name!r}; choose one of: {', '.join(presets) or '(none defined)'}")
        preset = presets[name]
        values = {**TrainConfig().to_dict(), **preset.settings}
        values.pop("data", None)  # the dataset stays the one on view
        return self._form_updates(values) + [gr.update(value=preset.description, visible=True)]

    def _form_updates(self, values: dict) -> list:
        """One update per form widget (value and visibility for `values[method]`), then the method's paragraph."""
        method = values.get(METHOD, TrainConfig().method)
        updates = []
        for s in form_settings():
            update = {"visible": s.applies_to(method)}
            if s.name in values:
                update["value"] = _shown(s, values[s.name])
            updates.append(gr.update(**update))
        return updates + [_method_note(method)]

    def restore_form(self) -> list:
        """After a reload: the form as the run in progress was started (no change when none is running)."""
        status = self.jobs.status()
        if not (status.running and status.settings):
            return [gr.update() for _ in form_settings()] + [gr.update(), gr.update()]
        return self._form_updates(status.settings) + [gr.update(value=str(status.settings["data"]))]

    def method_changed(self, method: str) -> list:
        """Show the settings the chosen method reads, hide the other methods' settings; describe the method."""
        return [gr.update(visible=s.applies_to(method)) for s in form_settings() if s.read_by is not None] + [
            _method_note(method)]

    def start_training(self, **form: object) -> tuple:
        """Start a run with the form's settings; refused with a message while another run is in progress."""
        form["data"] = self._dataset_path(typing.cast(str, form.get("data")))
        if not self._open(typing.cast(Path, form["data"])).rows:
            raise gr.Error("the dataset has no images yet: add some in step 1")
        cfg = _config_from_form(form)
        if cfg.cache_dir is None:  # runs on the same images then encode them once
            cfg = replace(cfg, cache_dir=self.output_dir / CACHE_DIR)
        try:
            self.jobs.start(cfg)
        except jobs.JobBusy as e:
            raise gr.Error(str(e)) from e
        return self.poll()

    def resume_training(self, run: str | None, max_steps: float | None = None) -> tuple:
        """Continue a run from its checkpoint (with the loss curve an uninterrupted run would have had)."""
        changes = {"max_steps": int(max_steps)} if max_steps else {}
        try:
            self.jobs.start(resume_config(self._run(run), **changes))
        except (jobs.JobBusy, ValueError) as e:
            raise gr.Error(str(e)) from e
        return self.poll()

    def stop_training(self) -> tuple:
        """Ask the run to stop after its current step; it still saves and exports what it has."""
        self.jobs.stop()
        return self.poll()

    def _handed_out_dir(self) -> Path:
        """The folder of files the page hands out: the only part of the output folder that is served."""
        return self.output_dir / GUI_CACHE_DIR / HANDED_OUT_DIR

    def _hand_out(self, path: Path) -> str:
        """Return a copy of `path` (a hard link where possible) in the page's own folder, which is served: files in
        the runs and datasets themselves never are."""
        folder = self._handed_out_dir() / uuid.uuid4().hex
        folder.mkdir(parents=True)
        copy = folder / Path(path).name
        try:
            os.link(path, copy)
        except OSError:
            shutil.copyfile(path, copy)
        return str(copy)

    def poll(self, shown: list[str] | None = None) -> tuple:
        """The training status the page shows: progress line, loss curves, the method's log, raw status, the
        buttons, the newest samples (sent only when they changed since `shown`) and the next-step button."""
        status = self.jobs.status()
        curves = _curves(status.losses)
        events = pd.DataFrame(list(status.events))
        samples = RunDir(status.run_dir).list_samples()[::-1][:SAMPLES_SHOWN] if status.run_dir else []
        names = [str(p) for p in samples]
        if shown is not None and names == shown:
            gallery = gr.update()  # unchanged: not sent again every second
        elif names:
            gallery = gr.update(value=[(self._hand_out(p), p.stem.replace("-", " ")) for p in samples],
                                label=f"Samples: {len(samples)}, newest first")
        else:
            gallery = gr.update(value=[], label=SAMPLES_EMPTY)
        ended = status.state in ("finished", "stopped")
        return (
            _status_html(status),
            curves,
            gr.update(value=events, visible=bool(status.events)),
            status.to_dict(),
            gr.update(interactive=not status.running),
            gr.update(interactive=status.running and status.state != "stopping"),
            gallery,
            names,
            gr.update(visible=ended),
            gr.update(visible=status.state != "idle"),
        )

    # -- 3. Results: runs

    def to_results(self, *selections: str | list[str] | None) -> tuple:
        """Training's next step: the Results step on its runs list, with fresh lists (`refresh`'s)."""
        return gr.Tabs(selected="results"), gr.Tabs(selected="runs"), *self.refresh(*selections)

    def runs_table(self) -> pd.DataFrame:
        """Every run: method, dataset, steps, state and latest CMMD."""
        rows, status = [], self.jobs.status()
        for r in jobs.list_runs(self.output_dir, self.jobs.training_dir()):
            score = f"{r.cmmd['cmmd']:.3f}" if r.cmmd else "-"
            steps = status.step if r.state == "training" else r.steps  # the files have the last checkpoint's
            rows.append([r.name, r.method, r.dataset, f"{steps} / {r.total}", r.state, score, r.updated])
        return pd.DataFrame(rows, columns=["run", "method", "dataset", "steps", "state", "CMMD", "updated"])

    def run_selected(self, table: pd.DataFrame, evt: gr.SelectData) -> str | None:
        """A click on a row of the runs table chooses that run for the actions."""
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        return str(table.iloc[row, 0]) if 0 <= row < len(table) else None

    def describe_run(self, run: str | None) -> str:
        """One paragraph on the chosen run: what it trained, its state and what can be done with it."""
        if not run:
            return "No run yet: train one in step 2." if not self._run_choices()[0] else "Choose a run."
        info = next((r for r in jobs.list_runs(self.output_dir, self.jobs.training_dir()) if r.name == run), None)
        if info is None:
            raise gr.Error(f"no run named {run!r}")
        status = self.jobs.status()
        steps = status.step if info.state == "training" else info.steps
        text = (f"**{html.escape(info.name)}**: {info.method} on *{html.escape(info.dataset)}*, {steps} of "
                f"{info.total} steps, {info.state}.")
        if info.error:
            text += f" Error: {html.escape(info.error)}"
        if info.state == "stopped":
            text += " Continue trains it on from its checkpoint."
        return text

    def delete_run(self, run: str | None) -> tuple:
        """Delete a run folder; refused while it trains."""
        if run == CANCELLED:
            return tuple(gr.update() for _ in range(7))
        try:
            jobs.delete_run(self.output_dir, run or "", self.jobs.training_dir())
        except ValueError as e:
            raise gr.Error(str(e)) from e
        return self.refresh()[2:-1] + (f"Deleted {html.escape(run or '')}.",)

    def _run(self, name: str | None) -> Path:
        try:
            return jobs.resolve_run(self.output_dir, name or "")
        except ValueError as e:
            raise gr.Error(str(e)) from e

    # -- 3. Results: compare

    def compare(self, runs: list[str] | None, prompts: str = "", seeds: str = "0", steps: float | None = None,
                progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 - how gradio injects a tracker
        """Base and the chosen runs on the same prompts and seeds: a labelled grid (one column per model, one row
        per prompt and seed), the slider for base and one run, and the grid as a PNG."""
        run_dirs = [self._run(name) for name in runs or []]
        try:
            seed_list = [int(s) for s in (seeds or "").replace(",", " ").split()] or [0]
        except ValueError as e:
            raise gr.Error(f"seeds must be whole numbers, got {seeds!r}") from e
        prompt_list = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        base = None if run_dirs else TrainConfig().base
        progress(0, desc="loading the models")

        def rendered(done: int, total: int) -> None:
            progress((done, total), desc=f"rendering image {done} of {total}", unit="images")

        try:
            result, grid = jobs.compare_runs(run_dirs, self._handed_out_dir() / jobs.COMPARE_DIR, prompt_list,
                                             seed_list,
                                             int(steps) if steps else None, base=base, progress=rendered)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        cells = jobs.save_cells(result, grid.with_suffix(""))
        methods = {r.name: r.method for r in jobs.list_runs(self.output_dir)}
        slider = gr.update(value=None, visible=False)
        if len(result.titles) == 2:  # base and one run: the first prompt and seed under a slider
            label, (left, right) = result.rows[0]
            slider = gr.update(value=(left, right), visible=True, label=" | ".join(result.titles) + f": {label}")
        return slider, _grid_html(result, cells, methods), str(grid)

    # -- 3. Results: evaluate

    def clip_status(self) -> tuple:
        """Which CLIP can score here, in plain words, and the CLIP choice that works (checked when the tab opens)."""
        found = clip_availability()
        demo = ("The **bundled demo CLIP** always works offline; its scores rank runs of the bundled demo model "
                "but mean nothing for other models and are not comparable to published CMMD.")
        if found.reference is not None:
            text = (f"The **reference CLIP** ({REFERENCE_MODEL}) is on this machine: its scores are comparable to "
                    "published CMMD. " + demo)
            choice = "reference"
        elif found.can_download:
            text = ("The **reference CLIP** is not on this machine yet: the first evaluation with it downloads about "
                    "1.7 GB. " + demo)
            choice = "reference"
        else:
            text = ("The **reference CLIP** is not on this machine, and this machine does not download models "
                    "(HF_HUB_OFFLINE is set), so scores here use the bundled demo CLIP unless you give the "
                    "reference weights file below. " + demo)
            choice = DEMO_CLIP
        return text, gr.update(value=choice)

    def score_table(self) -> pd.DataFrame:
        """One row per kept score: run, CLIP, images, steps, CMMD, the base model's and the difference."""
        rows = []
        for run in jobs.list_runs(self.output_dir):
            for c in RunDir(run.path).read_scores():
                base = c.get("base_cmmd")
                rows.append([run.name, run.method, _clip_name(c["clip_model"]), c["n_images"], c.get("steps"),
                             _round(c["cmmd"]), _round(base), _round(None if base is None else c["cmmd"] - base),
                             _short_note(c["clip_model"], c["trustworthy"])])
        return pd.DataFrame(rows, columns=["run", "method", "CLIP", "images", "steps", "CMMD", "base CMMD",
                                           "vs base", "note"])

    def evaluate(self, runs: list[str] | None, clip: str = "reference", clip_checkpoint: str | None = None,
                 steps: float | None = None, limit: float | None = None, base_too: bool = True,
                 progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 - how gradio injects a tracker
        """CMMD of each chosen run (op-lora.txt Sec. 4.1 protocol); returns the score table and a message."""
        if not runs:
            raise gr.Error("choose at least one run with a LoRA file")
        run_dirs = [self._run(name) for name in runs]
        progress(0, desc="loading CLIP")
        try:
            embedder = jobs.cached_embedder(DEMO_CLIP if clip == DEMO_CLIP else None, clip_checkpoint or None)
        except ClipWeightsMissing as e:
            where = f"at {clip_checkpoint}" if clip_checkpoint else "on this machine"
            raise gr.Error(f"The reference CLIP's weights are not {where}. Choose the bundled demo CLIP, or give "
                           "the path of the weights file (open_clip_model.safetensors of "
                           f"{REFERENCE_MODEL}).") from e
        except ValueError as e:
            raise gr.Error(str(e)) from e
        replaced = []
        for k, run_dir in enumerate(run_dirs):
            cfg = EvalConfig(run_dir, steps=int(steps) if steps else None, limit=int(limit) if limit else None,
                             base_too=bool(base_too))

            def generated(done: int, total: int, k: int = k) -> None:
                progress((k * total + done, len(run_dirs) * total), unit="images",
                         desc=f"{run_dirs[k].name}: image {done} of {total}")

            before = {_score_key(s) for s in RunDir(run_dir).read_scores()}
            try:
                result = evaluate_run(cfg, embedder, progress=generated)
            except (ValueError, FileNotFoundError) as e:
                raise gr.Error(f"{run_dir.name}: {e}") from e
            if _score_key(result) in before:
                replaced.append(run_dir.name)
        message = f"Scored {len(run_dirs)} run(s) with CLIP {_clip_name(embedder.model_name)}."
        if replaced:
            message += (f" This replaced the earlier score of {', '.join(replaced)} made with the same CLIP, "
                        "images and steps; scores made with other settings are kept.")
        return self.score_table(), message

    # -- 3. Results: export

    def export_lora(self, run: str | None, fmt: str = "diffusers", dtype: str = EXPORT_DEFAULTS.dtype) -> tuple:
        """Collapse the run's adapter into LoRA file(s) in the chosen format; return them and how to use each
        (diffusers code for the diffusers file, where to put the others), with the LoRA scale."""
        run_dir = self._run(run)
        if dtype not in DTYPE_NAMES:
            raise gr.Error(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        # Named after the run, so downloads from several runs do not overwrite each other; every kind but the
        # diffusers one gets its suffix (`_kohya`, `_lycoris`, `_comfyui`, `_a1111`).
        name = run_dir / f"{run_dir.name}{DTYPE_SUFFIXES[DTYPE_NAMES[dtype]]}.safetensors"
        try:
            files = export(run_dir, name, DTYPE_NAMES[dtype], format=fmt, suffixed=True)
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e
        return [self._hand_out(f) for f in files.values()], jobs.usage(run_dir, files)


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _thumbnail(path: Path) -> Image.Image:
    """A small RGB copy of an image for the page: the gallery then serves its own files from the output folder
    (never the dataset's, wherever it lies) and sends kilobytes, not full-size photos."""
    with Image.open(path) as im:
        small = ImageOps.exif_transpose(im).convert("RGB")
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return small


def _curves(losses: typing.Sequence[tuple[int, float]]) -> pd.DataFrame:
    """The loss plot's rows: step, loss, line (raw or smoothed).

    Typed even when empty, since the plot fixes its axes' kind (numbers, not categories) from the first value;
    and never empty, since a plot that starts without a row of each line never draws them (one empty row each).
    """
    rows = jobs.loss_curves(losses) or [(0, math.nan, line) for line in ("raw", "smoothed")]
    return pd.DataFrame(rows, columns=["step", "loss", "line"]).astype({"step": int, "loss": float, "line": str})


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _short_note(clip_model: str, trustworthy: bool) -> str:
    """`score_note` in a table cell's words: the page explains the CLIP models above the table."""
    note = score_note(clip_model, trustworthy)
    if not note or not trustworthy:
        return note
    return "not comparable to published CMMD"


def _clip_name(model: str) -> str:
    """A CLIP model as the page names it."""
    return "bundled demo CLIP" if model.startswith("local-dir:") else model


def _score_key(score: dict) -> tuple:
    return tuple(score.get(k) for k in RunDir.SCORE_KEY)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _status_html(status: jobs.JobStatus) -> str:
    """One line and a progress bar for the training job."""
    if status.state == "idle":
        return ("<div id='job-status'>No run started since the server started. Choose the settings below and press "
                "<b>Start training</b>; progress, loss and samples appear here.</div>")
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


def _grid_html(result: jobs.Comparison, cells: list[list[Path]], methods: dict[str, str]) -> str:
    """The comparison as a table: a header row of model names, one row per prompt and seed, each image in its
    column and row (`data-column` / `data-row` name them; the image's title repeats both)."""
    head = "".join(f"<th data-column='{html.escape(t)}'>{html.escape(t)}"
                   + (f"<br><span class='ref'>{html.escape(methods[t])}</span>" if t in methods else "") + "</th>"
                   for t in result.titles)
    body = []
    for (label, _), paths in zip(result.rows, cells, strict=True):
        tds = "".join(
            f"<td data-column='{html.escape(t)}' data-row='{html.escape(label)}'><img src='gradio_api/file={p}' "
            f"alt='{html.escape(t)}: {html.escape(label)}' title='{html.escape(t)}: {html.escape(label)}'></td>"
            for t, p in zip(result.titles, paths, strict=True))
        body.append(f"<tr><th data-row='{html.escape(label)}'>{html.escape(label)}</th>{tds}</tr>")
    return (f"<div class='scroll'><table><thead><tr><th>prompt and seed</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


# ---------------------------------------------------------------------------------------------------------------
# The page


def build_app(output_dir: Path, max_upload_bytes: int) -> gr.Blocks:
    """Return the Blocks of the GUI over the runs in `output_dir` (not launched)."""
    app = App(output_dir)
    settings = form_settings()
    default_method = TrainConfig().method
    with gr.Blocks(title="opdiff", analytics_enabled=False) as demo:
        gr.Markdown("# opdiff studio\nTeach Stable Diffusion XL your images in three steps, then download a plain "
                    "LoRA file for diffusers, ComfyUI, AUTOMATIC1111 or Forge.")
        with gr.Tabs(elem_id="steps") as steps:
            # ------------------------------------------------------------------ 1. Dataset
            with gr.Tab("1. Dataset", id="dataset") as dataset_tab:
                with gr.Row(elem_classes="actions"):
                    view_dataset = gr.Dropdown(label="Dataset on view (the one training uses)", scale=3,
                                               allow_custom_value=True, elem_id="view-dataset", min_width=260)
                    next_train = gr.Button("Next: 2. Train on this dataset", variant="primary", visible=False,
                                           elem_id="next-train")
                with gr.Row(elem_classes="actions"):
                    dataset_name = gr.Textbox(label="Name", placeholder="e.g. My cat", elem_id="dataset-name",
                                              info="Create: a new dataset of this name. Rename: the one on view.",
                                              min_width=260)
                    create = gr.Button("Create", elem_id="create-dataset")
                    rename = gr.Button("Rename", elem_id="rename-dataset")
                    delete = gr.Button("Delete", variant="stop", elem_id="delete-dataset")
                upload = gr.File(file_count="multiple", elem_id="upload", height=120,
                                 label=f"Add images to the dataset on view: images with same-name .txt captions, a "
                                       f"metadata.jsonl, or a .zip of either (at most {max_upload_bytes / 2**20:.3g} "
                                       "MB per file)",
                                 file_types=[".png", ".jpg", ".jpeg", ".webp", ".txt", ".jsonl", ".zip"])
                dataset_message = gr.Markdown(elem_id="dataset-message")
                gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=THUMBNAIL_COLUMNS, height=190,
                                     elem_id="thumbnails", allow_preview=False, fit_columns=False)
                with gr.Row(elem_classes="settings"):
                    image = gr.Dropdown(label="Image", elem_id="image", scale=1, min_width=200,
                                        allow_custom_value=True)
                    caption = gr.Textbox(label="Caption", elem_id="caption", scale=3, min_width=260, lines=2,
                                         info="What the image shows, in the words you will prompt with.")
                with gr.Row(elem_classes="actions"):
                    save_caption = gr.Button("Save caption", elem_id="save-caption", variant="primary")
                    remove = gr.Button("Remove image from the dataset", elem_id="remove-image")
                with gr.Accordion("All captions (edit several, then save)", open=False):
                    captions = gr.Dataframe(headers=["file", "caption"], type="array", interactive=True, wrap=True,
                                            static_columns=[0], show_label=False, elem_id="captions")
                    save_button = gr.Button("Save captions", elem_id="save-captions")
                with gr.Accordion("Files not used", open=False) as not_used:
                    rejected = gr.Dataframe(headers=["file", "reason"], type="array", interactive=False, wrap=True,
                                            show_label=False, elem_id="rejected", column_widths=["30%", "70%"])

            # ------------------------------------------------------------------ 2. Train
            with gr.Tab("2. Train", id="train") as train_tab:
                status_html = gr.HTML(_status_html(jobs.JobStatus()), elem_id="status")
                with gr.Row(elem_classes="actions"):
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                    next_results = gr.Button("Next: 3. Results", variant="primary", visible=False,
                                             elem_id="next-results")
                with gr.Row(elem_classes="settings", visible=False) as live:
                    loss_plot = gr.LinePlot(_curves(()), x="step", y="loss", color="line", title="Training loss", height=240,
                                            elem_id="loss-plot", min_width=360,
                                            color_map={"raw": "#b0b7c3", "smoothed": "#e4572e"})
                    samples = gr.Gallery(label=SAMPLES_EMPTY, columns=4, height=240, elem_id="samples", min_width=360,
                                         allow_preview=True, preview=False, fit_columns=False,
                                         object_fit="contain")  # a whole grid in each thumbnail, labels too
                samples_shown = gr.State(None)
                selections = gr.Dataframe(label="What the method did", visible=False, interactive=False,
                                          elem_id="method-events")

                preset = gr.Dropdown(label="Preset", visible=False, elem_id="preset", allow_custom_value=True,
                                     info="Settings for a common goal; everything below stays editable.")
                preset_about = gr.Markdown(visible=False, elem_id="preset-about")
                form: dict[str, gr.components.Component] = {}
                shown = form_spec(default_method)
                method_setting = next(s for s in settings if s.name == METHOD)
                with gr.Group():
                    form[METHOD] = _widget(method_setting)
                    method_about = gr.Markdown(_method_note(default_method), elem_id="method-about", padding=True)
                    with gr.Row(elem_classes="settings"):
                        for s in settings:
                            if s.read_by is not None:
                                form[s.name] = _widget(s, s.name in shown.get(s.group, []))
                for group in (g for g in GROUPS if g != "method"):  # the method's own sit under it, above
                    members = [s for s in settings if s.group == group and s.name not in form]
                    if not members:
                        continue
                    with gr.Accordion(GROUP_TITLES.get(group, group), open=group in OPEN_GROUPS):
                        with gr.Row(elem_classes="settings"):
                            for s in members:
                                if s.name == "data":  # the dataset picker: the named datasets and the bundled one
                                    form["data"] = gr.Dropdown(label="Dataset (the one on view in step 1)",
                                                               info=_info(s), allow_custom_value=True,
                                                               elem_id="field-data", min_width=260)
                                else:
                                    form[s.name] = _widget(s, s.name in shown.get(group, []))
                start = gr.Button("Start training", variant="primary", elem_id="start")
                with gr.Accordion("Raw status", open=False):
                    job = gr.JSON(label="job")
                timer = gr.Timer(POLL_SECONDS)

            # ------------------------------------------------------------------ 3. Results
            with gr.Tab("3. Results", id="results") as results_tab:
                with gr.Tabs(elem_id="results-tabs") as results:
                    with gr.Tab("Runs", id="runs"):
                        runs = gr.Dataframe(interactive=False, wrap=True, elem_id="runs", show_label=False,
                                            column_widths=["25%", "11%", "12%", "14%", "13%", "9%", "16%"])
                        with gr.Row(equal_height=True, elem_classes="settings"):
                            run_pick = gr.Dropdown(label="Run", allow_custom_value=True, scale=2, elem_id="run-pick")
                            more_steps = gr.Number(None, label="Train up to (steps)", precision=0,
                                                   elem_id="more-steps", placeholder="empty",
                                                   info="For Continue: steps in all; empty: the run's own.")
                        run_about = gr.Markdown(elem_id="run-about")
                        with gr.Row(elem_classes="actions"):
                            continue_run = gr.Button("Continue training", elem_id="continue-run")
                            to_compare = gr.Button("Compare", elem_id="to-compare")
                            to_export = gr.Button("Export", elem_id="to-export")
                            delete_run = gr.Button("Delete run", variant="stop", elem_id="delete-run")

                    with gr.Tab("Compare", id="compare"):
                        gr.Markdown("The base model and each chosen run's LoRA file, on the same prompts, seeds and "
                                    "starting noise: one column per model, one row per prompt and seed.")
                        with gr.Row(elem_classes="settings"):
                            compare_runs = gr.Dropdown(label="Runs", multiselect=True, allow_custom_value=True,
                                                       scale=3, elem_id="compare-runs")
                            compare_steps = gr.Number(None, label="Denoising steps", precision=0,
                                                      elem_id="compare-steps", placeholder="empty",
                                                      info="Empty: the first run's sample steps.")
                        with gr.Row(elem_classes="settings"):
                            compare_prompts = gr.Textbox(label="Prompts", lines=2, elem_id="compare-prompts", scale=3,
                                                         info="One per line; empty: the first run's sample prompts.")
                            compare_seeds = gr.Textbox("0", label="Seeds", elem_id="compare-seeds",
                                                       info="Separated by spaces; each prompt once per seed.")
                        compare_button = gr.Button("Render", variant="primary", elem_id="render")
                        compare_grid = gr.HTML(elem_id="compare-grid")
                        slider = gr.ImageSlider(label="base | run", type="pil", format="png", visible=False,
                                                elem_id="slider", max_height=420)
                        grid_file = gr.File(label="The grid as one PNG", elem_id="grid-file")

                    with gr.Tab("Evaluate", id="evaluate") as evaluate_tab:
                        clip_note = gr.Markdown(elem_id="clip-note")
                        with gr.Row(elem_classes="settings"):
                            eval_runs = gr.Dropdown(label="Runs", multiselect=True, allow_custom_value=True, scale=2,
                                                    elem_id="eval-runs")
                            clip = gr.Radio([("reference CLIP ViT-L/14, 336 px", "reference"),
                                             ("bundled demo CLIP", DEMO_CLIP)], value="reference", label="CLIP",
                                            elem_id="clip")
                            clip_checkpoint = gr.Textbox(label="Reference CLIP weights file", elem_id="clip-file",
                                                         info="Only when the reference CLIP is not found by itself.")
                        with gr.Row(elem_classes="settings"):
                            eval_steps = gr.Number(None, label="Denoising steps", precision=0, elem_id="eval-steps",
                                                   placeholder="empty",
                                                   info="Empty: the run's sample steps.")
                            eval_limit = gr.Number(None, label="Images", precision=0, elem_id="eval-limit",
                                                   placeholder="empty",
                                                   info="One per training caption; empty: all captions.")
                            base_too = gr.Checkbox(True, label="Score the base model too", elem_id="base-too",
                                                   info="Gives the difference column; doubles the images made.")
                        eval_button = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
                        eval_message = gr.Markdown(elem_id="eval-message")
                        gr.Markdown(CMMD_HOW_TO_READ + " *vs base* is the run's CMMD minus the base model's. "
                                    "Each score is kept per CLIP, image count and steps.")
                        scores = gr.Dataframe(label="Scores", interactive=False, wrap=True, elem_id="scores",
                                              column_widths=["20%", "9%", "13%", "8%", "7%", "8%", "8%", "8%", "19%"])

                    with gr.Tab("Export", id="export"):
                        gr.Markdown("The adapter collapsed into LoRA files. **diffusers**: one file for "
                                    "`pipe.load_lora_weights`. **kohya**: the file(s) for ComfyUI, AUTOMATIC1111, "
                                    "Forge and sd-scripts (DoRA methods get one per program family, since they "
                                    "compute DoRA differently). **both**: all of them.")
                        with gr.Row(elem_classes="settings"):
                            export_run = gr.Dropdown(label="Run", allow_custom_value=True, scale=2,
                                                     elem_id="export-run")
                            fmt = gr.Radio(list(FORMATS), value="diffusers", label="Format", elem_id="format")
                            dtype = gr.Radio(list(DTYPES), value=EXPORT_DEFAULTS.dtype, label="Precision",
                                             elem_id="dtype", info="fp32 is exact; fp16 and bf16 halve the size.")
                        export_button = gr.Button("Export", variant="primary", elem_id="export")
                        export_files = gr.File(label="LoRA file(s)", file_count="multiple", elem_id="export-files")
                        usage = gr.Markdown(elem_id="usage")

        # ---------------------------------------------------------------------- events
        data_pickers = [view_dataset, form["data"]]
        dataset_outputs = [gallery, captions, rejected, dataset_message, image, next_train, not_used]
        create.click(app.create_dataset, dataset_name, [*data_pickers, dataset_name, *dataset_outputs],
                     api_name="create_dataset")
        upload.upload(app.add_files, [view_dataset, upload, dataset_name], [*data_pickers, upload, *dataset_outputs],
                      api_name="add_files")
        rename.click(app.rename_dataset, [view_dataset, dataset_name], [*data_pickers, dataset_name,
                                                                         *dataset_outputs], api_name="rename_dataset")
        delete.click(app.delete_dataset, view_dataset, [*data_pickers, *dataset_outputs], api_name="delete_dataset",
                     js=f"(d) => confirm('Delete this dataset and its images?') ? d : '{CANCELLED}'")
        view_dataset.input(app.show_dataset, view_dataset, dataset_outputs, api_name="show_dataset").then(
            _same, view_dataset, form["data"], api_name="dataset_to_training")
        form["data"].input(_same, form["data"], view_dataset, api_name="training_to_dataset").then(
            app.show_dataset, view_dataset, dataset_outputs, api_name="show_training_dataset")
        image.change(app.pick_image, [view_dataset, image], caption, api_name="pick_image")
        gallery.select(_gallery_pick, captions, image, api_name="gallery_pick")
        save_caption.click(app.save_caption, [view_dataset, image, caption], dataset_outputs, api_name="save_caption")
        remove.click(app.remove_images, [view_dataset, image], dataset_outputs, api_name="remove_images")
        save_button.click(app.save_captions, [view_dataset, captions], dataset_outputs, api_name="save_captions")
        next_train.click(_to_train, outputs=steps, api_name="go_train")

        preset_outputs = [form[s.name] for s in settings] + [method_about, preset_about]
        empty_boxes = [form[s.name] for s in _optional_numbers()]  # boxes just drawn or shown hold gradio's 0
        preset.input(app.apply_preset, preset, preset_outputs, api_name="apply_preset").then(
            _emptied, empty_boxes, empty_boxes, api_name="empty_boxes_after_preset", show_progress="hidden")
        method_widgets = [form[s.name] for s in settings if s.read_by is not None]
        form[METHOD].change(app.method_changed, form[METHOD], [*method_widgets, method_about],
                            api_name="method_changed").then(
            _emptied, empty_boxes, empty_boxes, api_name="empty_boxes_after_method", show_progress="hidden")
        status_outputs = [status_html, loss_plot, selections, job, start, stop, samples, samples_shown,
                          next_results, live]
        start.click(_keyword_handler(app.start_training, form), inputs_kwargs=form, outputs=status_outputs,
                    api_name="start_training", js="(...args) => { window.scrollTo({top: 0}); return args; }")
        stop.click(app.stop_training, outputs=status_outputs, api_name="stop_training")
        timer.tick(app.poll, samples_shown, status_outputs, api_name="status", show_progress="hidden")

        run_pick.change(app.describe_run, run_pick, run_about, api_name="describe_run")
        runs.select(app.run_selected, runs, run_pick, api_name="run_selected")
        continue_run.click(app.resume_training, [run_pick, more_steps], status_outputs, api_name="resume_training"
                           ).success(_to_train, outputs=steps, api_name="go_train_after_resume")
        to_compare.click(_to_compare, run_pick, [compare_runs, results], api_name="compare_run")
        to_export.click(_to_export, run_pick, [export_run, results], api_name="export_run")
        list_outputs = [compare_runs, eval_runs, export_run, run_pick, runs, scores]
        delete_run.click(app.delete_run, run_pick, [*list_outputs, run_about], api_name="delete_run",
                         js=f"(r) => confirm('Delete run ' + r + ' and its files?') ? r : '{CANCELLED}'")

        compare_button.click(app.compare, [compare_runs, compare_prompts, compare_seeds, compare_steps],
                             [slider, compare_grid, grid_file], api_name="compare")
        evaluate_tab.select(app.clip_status, outputs=[clip_note, clip], api_name="clip_status")
        eval_button.click(app.evaluate, [eval_runs, clip, clip_checkpoint, eval_steps, eval_limit, base_too],
                          [scores, eval_message], api_name="evaluate")
        export_button.click(app.export_lora, [export_run, fmt, dtype], [export_files, usage], api_name="export")

        list_inputs = [view_dataset, compare_runs, eval_runs, export_run, run_pick]
        lists = [view_dataset, form["data"], *list_outputs, run_about]
        demo.load(app.refresh, list_inputs, lists, api_name="refresh").then(
            app.restore_form, outputs=[*(form[s.name] for s in settings), method_about, view_dataset],
            api_name="restore_form").then(
            app.show_dataset, view_dataset, dataset_outputs, api_name="show_dataset_on_load").then(
            _emptied, empty_boxes, empty_boxes, api_name="empty_boxes_on_load", show_progress="hidden")
        step_boxes = [more_steps, compare_steps, eval_steps, eval_limit]  # 0 is never meant in these: empty
        demo.load(_zero_is_empty, step_boxes, step_boxes, api_name="empty_step_boxes_on_load", show_progress="hidden")
        demo.load(app.presets, outputs=[preset, preset_about], api_name="presets")
        demo.load(app.poll, samples_shown, status_outputs, api_name="status_on_load")
        demo.load(app.clip_status, outputs=[clip_note, clip], api_name="clip_status_on_load")
        for tab in (dataset_tab, train_tab, results_tab):  # sub-tabs share the lists of their step
            tab.select(app.refresh, list_inputs, lists, api_name=f"refresh_{tab.id}")
        for s in _run_pickers():
            demo.load(app.scoring_runs, outputs=form[s.name], api_name=f"{s.name}_runs_on_load",
                      show_progress="hidden")
            train_tab.select(app.scoring_runs, outputs=form[s.name], api_name=f"{s.name}_runs", show_progress="hidden")
        next_results.click(app.to_results, list_inputs, [steps, results, *lists], api_name="go_results")
    return demo


def _same(dataset: str | None) -> str | None:
    """The dataset on view is the one training uses: each picker follows the other."""
    return dataset


def _to_train() -> gr.Tabs:
    """The Train step."""
    return gr.Tabs(selected="train")


def _to_compare(run: str | None) -> tuple:
    """The runs list's Compare: the run chosen for comparing, the Compare tab open."""
    return gr.update(value=[run] if run else []), gr.Tabs(selected="compare")


def _to_export(run: str | None) -> tuple:
    """The runs list's Export: the run chosen for export, the Export tab open."""
    return gr.update(value=run), gr.Tabs(selected="export")


def _gallery_pick(table: list[list[str]] | None, evt: gr.SelectData) -> str | None:
    """The image a click on the thumbnails chose: the thumbnails are in the captions table's order."""
    rows = [row for row in table or [] if row and row[0]]
    return rows[evt.index][0] if isinstance(evt.index, int) and 0 <= evt.index < len(rows) else None


def resolve_address(host: str | None = None, port: int | None = None) -> tuple[str, int]:
    """The address to serve on: the flags when given, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else
    127.0.0.1:7860."""
    host = host or os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    if port is None:
        text = os.environ.get("GRADIO_SERVER_PORT")
        try:
            port = int(text) if text else DEFAULT_PORT
        except ValueError:
            raise SystemExit(f"GRADIO_SERVER_PORT must be a port number, got {text!r}") from None
    return host, port


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


def serve(output_dir: str | Path = "runs", host: str | None = None, port: int | None = None,
          max_upload_mb: float = 500, block: bool = True, auth: tuple[str, str] | None = None,
          **launch: object) -> gr.Blocks:
    """Build and launch the GUI; return the running Blocks (with `block=False`, at once, serving in a thread).

    `host` / `port` default to GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else 127.0.0.1:7860. Uploads and every file
    the page shows live under `output_dir`; only what the page handed out is served from it (never the runs or
    datasets themselves). Uploads over `max_upload_mb` are refused. `auth` (user, password) asks for a login;
    without one, a host beyond loopback gets a warning on stderr (`exposure_warning`). Further keyword arguments go
    to `gr.Blocks.launch`.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    # gradio keeps uploads and the files it serves in GRADIO_TEMP_DIR; read when components are built.
    os.environ["GRADIO_TEMP_DIR"] = str(output_dir / GUI_CACHE_DIR)
    max_upload_bytes = int(max_upload_mb * 2**20)
    host, port = resolve_address(host, port)
    if warning := exposure_warning(host, auth):
        print(warning, file=sys.stderr)
    demo = build_app(output_dir, max_upload_bytes)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=False, max_file_size=max_upload_bytes, auth=auth, css=CSS,
                theme=THEME, prevent_thread_lock=not block, quiet=not block, show_error=True, footer_links=["api"],
                **launch)
    return demo


def build_parser(prog: str = "app.py") -> argparse.ArgumentParser:
    """Return the GUI's argument parser (`python app.py` and `opdiff-app` share it); its options are `serve`'s
    keyword arguments."""
    parser = argparse.ArgumentParser(prog=prog, description="Start the opdiff web GUI.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default=None,
                        help=f"address to bind (default: GRADIO_SERVER_NAME, else {DEFAULT_HOST}); 0.0.0.0 exposes "
                             "the GUI (and training on this machine) to the network")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port to listen on (default: GRADIO_SERVER_PORT, else {DEFAULT_PORT})")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"),
                        help="folder for runs, datasets and exports; only the files the page hands out are served")
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
        args.auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV))
    except ValueError as e:
        parser.error(str(e))
    serve(**vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
