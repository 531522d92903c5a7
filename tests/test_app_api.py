"""The GUI driven through its API with gradio_client, as a script would: named datasets -> train -> runs ->
compare -> evaluate -> export, the refusals (unknown dataset, a second run, deleting what a run uses), clean stops,
failed starts, and the security limits (upload size, zip paths, served files, the address it binds, login).

One app per module, served from a thread on a free port, over a fresh output folder.
"""

from __future__ import annotations

import html.parser
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

import httpx
import numpy as np
import pytest
import tomllib
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors.torch import load_file

from pipelines import jobs, presets
from pipelines.model import load_pipeline
from pipelines.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
MAX_UPLOAD_MB = 1
TRAIN_STEPS = 8

pytestmark = pytest.mark.slow


def load_app() -> ModuleType:
    """Import the top-level app.py (it is not part of an installed package)."""
    if "app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("app", REPO / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["app"] = module
        spec.loader.exec_module(module)
    return sys.modules["app"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(client: Client) -> dict:
    """The raw job status (the 4th output of /status)."""
    return client.predict(api_name="/status")[3]


def wait_until_ended(client: Client, timeout: float = 60) -> dict:
    """Poll /status until the job is no longer running; return its raw status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = status(client)
        if job["state"] not in ("starting", "training", "stopping"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"run still going after {timeout} s: {job}")


def wait_for_step(client: Client, step: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (job := status(client))["step"] < step:
        assert time.monotonic() < deadline, f"training did not reach step {step}: {job}"
        time.sleep(0.1)
    return job


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread, and robust when cores are shared
    out = tmp_path_factory.mktemp("app-runs")
    demo = load_app().serve(out, port=free_port(), max_upload_mb=MAX_UPLOAD_MB, block=False)
    yield SimpleNamespace(url=demo.local_url, out=out)
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server, tmp_path_factory) -> Client:
    return Client(server.url, verbose=False, download_files=tmp_path_factory.mktemp("downloads"),
                  analytics_enabled=False)


def _demo_files(bundled_data: Path, images: range) -> list:
    files = []
    for image in [sorted(bundled_data.glob("*.png"))[i] for i in images]:
        files += [handle_file(image), handle_file(image.with_suffix(".txt"))]
    return files


@pytest.fixture(scope="module")
def dataset(client, bundled_data, tmp_path_factory) -> tuple:
    """A dataset named "Shapes": four demo images with captions, a corrupt PNG and an empty WEBP added to it."""
    created = client.predict("Shapes", api_name="/create_dataset")
    junk = tmp_path_factory.mktemp("junk")
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (junk / "empty.webp").write_bytes(b"")
    files = _demo_files(bundled_data, range(4)) + [handle_file(junk / "broken.png"), handle_file(junk / "empty.webp")]
    added = client.predict(created[0]["value"], files, "", api_name="/add_files")
    return created, added


@pytest.fixture(scope="module")
def run(client, dataset, server) -> Path:
    """A finished LoRA run on the dataset, started through the API."""
    job = client.predict(data="Shapes", max_steps=TRAIN_STEPS, lr=1e-2, api_name="/start_training")[3]
    assert job["state"] in ("starting", "training") and job["method"] == "lora"
    job = wait_until_ended(client)
    assert job["state"] == "finished", job
    return server.out / job["run"]


@pytest.fixture(scope="module")
def second_run(client, run, server) -> Path:
    """A finished run of a method with its own settings (the first one in the registry that has any)."""
    method, setting = _method_with_settings()
    job = client.predict(data="Shapes", method=method, max_steps=3, lr=1e-2, api_name="/start_training",
                         **{setting.name: setting.default + 1})[3]
    job = wait_until_ended(client)
    assert job["state"] == "finished" and job["method"] == method, job
    return server.out / job["run"]


def _method_with_settings():
    app = load_app()
    setting = next(s for s in app.form_settings() if s.read_by and s.item_type is int and s.default)
    return setting.read_by[0], setting


def test_a_named_dataset_takes_uploads_and_lists_refused_files_by_their_names(dataset, server):
    created, (view, training, upload, gallery, table, rejected, message, image) = dataset
    root = Path(created[0]["value"])
    assert root.parent == server.out / "datasets" and "Created **Shapes**" in created[6]
    assert view["value"] == training["value"] == str(root)  # the dataset on view is the one training uses
    assert any(label.startswith("Shapes (4 images)") for label, _ in view["choices"])
    assert upload is None  # the upload box is cleared after the import
    assert [row[0] for row in table["data"]] == [f"demo_0{i}.png" for i in range(4)]
    assert all("opdiff style" in row[1] for row in table["data"]) and len(gallery["value"]) == 4
    reasons = dict(map(tuple, rejected["data"]))
    assert reasons == {"broken.png": "not a readable image: the file is damaged or not a PNG, JPEG or WEBP image",
                       "empty.webp": "empty file (0 bytes)"}
    assert "Added 4 image(s). 2 file(s) were not used" in message and "**Shapes**: 4 image(s)." in message
    assert image["value"] == "demo_00.png"


def test_a_zip_and_more_images_join_the_same_dataset(client, bundled_data, tmp_path):
    root = client.predict("Zip test", api_name="/create_dataset")[0]["value"]
    client.predict(root, _demo_files(bundled_data, range(4, 6)), "", api_name="/add_files")
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for image in sorted(bundled_data.glob("*.png"))[5:8]:  # demo_05 is in the dataset already
            z.write(image, image.name)
            z.write(image.with_suffix(".txt"), image.with_suffix(".txt").name)
    _, _, _, _, table, rejected, message, _ = client.predict(root, [handle_file(archive)], "", api_name="/add_files")
    assert [row[0] for row in table["data"]] == ["demo_04.png", "demo_05.png", "demo_06.png", "demo_07.png"]
    assert rejected["data"] == [["more.zip: demo_05.png", "the dataset already has a file of this name; rename the "
                                 "file or remove the other one first"]]
    assert "Added 2 image(s)" in message
    names = [p.name for p in Path(root).iterdir()]
    assert len([n for n in names if n.endswith(".png")]) == 4 and len(jobs.list_datasets(Path(root).parent)) >= 2


def test_uploading_while_the_demo_is_on_view_makes_a_new_named_dataset(client, bundled_data):
    view, *_, message, _ = client.predict("", [handle_file(sorted(bundled_data.glob("*.png"))[9])], "",
                                          api_name="/add_files")
    assert jobs.dataset_name(view["value"]).startswith("My images")
    assert "1 image(s) have no caption yet" in message
    with pytest.raises(AppError, match="already exists"):
        client.predict(jobs.dataset_name(view["value"]), api_name="/create_dataset")


def test_captions_are_edited_one_by_one_or_in_the_table(client, dataset):
    root = dataset[0][0]["value"]
    assert client.predict(root, "demo_01.png", api_name="/pick_image").startswith("a painting")
    _, table, _, message, _ = client.predict(root, "demo_01.png", "  a fixed caption ", api_name="/save_caption")
    assert table["data"][1] == ["demo_01.png", "a fixed caption"]
    assert message.startswith("Caption of demo_01.png saved")
    assert (Path(root) / "demo_01.txt").read_text() == "a fixed caption"
    rows = [list(r) for r in table["data"]]
    rows[0][1] = "  a new caption  "
    _, table, _, message, _ = client.predict(root, {"headers": ["file", "caption"], "data": rows},
                                             api_name="/save_captions")
    assert table["data"][0] == ["demo_00.png", "a new caption"] and message.startswith("Captions saved.")
    with pytest.raises(AppError, match="is not an image of dataset"):
        client.predict(root, {"headers": ["file", "caption"], "data": [["../x.png", "no"]]},
                       api_name="/save_captions")
    with pytest.raises(AppError, match="read-only"):
        client.predict("", "demo_00.png", "x", api_name="/save_caption")


def test_images_are_removed_and_datasets_renamed_and_deleted(client, bundled_data):
    root = client.predict("Scratch", api_name="/create_dataset")[0]["value"]
    client.predict(root, _demo_files(bundled_data, range(10, 13)), "", api_name="/add_files")
    _, table, _, message, _ = client.predict(root, ["demo_11.png"], api_name="/remove_images")
    assert [r[0] for r in table["data"]] == ["demo_10.png", "demo_12.png"] and "Removed demo_11.png" in message
    with pytest.raises(AppError, match="is not an image of dataset"):
        client.predict(root, ["nope.png"], api_name="/remove_images")

    view, *_ = client.predict(root, "Scratch renamed", api_name="/rename_dataset")
    assert view["value"] == root and ("Scratch renamed (2 images)", root) in map(tuple, view["choices"])
    with pytest.raises(AppError, match="already exists"):
        client.predict(root, "Shapes", api_name="/rename_dataset")
    assert client.predict("Scratch renamed", api_name="/show_dataset")[1]["data"][0][0] == "demo_10.png"

    view, training, _, table, _, message, _ = client.predict(root, api_name="/delete_dataset")
    assert not Path(root).exists() and "Deleted **Scratch renamed**" in message
    assert root not in [v for _, v in view["choices"]] and view["value"] == training["value"] != root
    with pytest.raises(AppError, match="read-only"):
        client.predict("", api_name="/delete_dataset")


def test_unknown_datasets_are_refused_by_name(client):
    image = handle_file(REPO / "assets" / "demo-data" / "demo_00.png")
    for api_name, args in (("/show_dataset", ("no such set",)), ("/add_files", ("no such set", [image], "")),
                           ("/delete_dataset", ("/etc",)), ("/rename_dataset", ("../..", "x"))):
        with pytest.raises(AppError, match="unknown dataset"):
            client.predict(*args, api_name=api_name)
    with pytest.raises(AppError, match="unknown dataset 'no such set'"):
        client.predict(data="no such set", max_steps=2, api_name="/start_training")
    empty = client.predict("Empty", api_name="/create_dataset")[0]["value"]
    with pytest.raises(AppError, match="has no images yet"):
        client.predict(data=empty, max_steps=2, api_name="/start_training")


def test_training_reports_progress_and_the_run_is_listed(run, client):
    _, losses, _, job, _ = client.predict(api_name="/status")
    assert job["run"] == run.name and job["step"] == job["total"] == TRAIN_STEPS
    raw = [row for row in losses["data"] if row[2] == "raw"]
    smooth = [row for row in losses["data"] if row[2] == "smoothed"]
    assert [row[0] for row in raw] == [row[0] for row in smooth] == list(range(1, TRAIN_STEPS + 1))
    assert smooth[0][1] == pytest.approx(raw[0][1])  # the smoothed line starts at the first loss
    assert (run / "lora.safetensors").is_file()
    refreshed = client.predict(api_name="/refresh")
    assert run.name in [value for _, value in refreshed[4]["choices"]]  # offered for export
    table = {row[0]: row for row in refreshed[6]["data"]}
    assert table[run.name][1:6] == ["lora", "Shapes", f"{TRAIN_STEPS} / {TRAIN_STEPS}", "finished", "-"]
    assert "finished" in client.predict(run.name, api_name="/describe_run")


def test_a_run_is_watched_restored_refused_twice_stopped_and_continued(client, dataset, server):
    """While a run trains: a second start is refused, its dataset and the run cannot be deleted, a sample file
    shows in the gallery, the form comes back with its settings; Stop ends it cleanly (it exports what it
    learned); Continue trains it on with one unbroken loss curve. MPOR's selection log is shown."""
    root = dataset[0][0]["value"]
    mpor = {"method": "lora-over-mpor", "select_every": 1, "select_top_n": 2, "select_split": 2}
    client.predict(data=root, max_steps=100_000, api_name="/start_training", **mpor)
    try:
        with pytest.raises(AppError, match="a run is already in progress"):
            client.predict(data=root, max_steps=5, api_name="/start_training")
        with pytest.raises(AppError, match="being trained on: stop the run"):
            client.predict(root, api_name="/delete_dataset")
        job = wait_for_step(client, 2)
        with pytest.raises(AppError, match="is training: stop it"):
            client.predict(job["run"], api_name="/delete_run")

        samples = server.out / job["run"] / "samples"
        samples.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), "blue").save(samples / "step-000001.png")
        html, _, selected, job, gallery = client.predict(api_name="/status")
        assert [Path(item["image"]).name for item in gallery["value"]] == ["step-000001.png"]
        assert [item["caption"] for item in gallery["value"]] == ["step 000001"]
        assert gallery["label"] == "Samples: 1, newest first"
        assert selected["visible"] and selected["value"]["headers"] == ["step", "group", "layer", "matrix", "score"]
        assert len(selected["value"]["data"]) >= 8  # one matrix per group (4 module kinds x A/B) per round
        assert "ETA" in html and "<progress" in html

        restored = client.predict(api_name="/restore_form")
        values = {s.name: u.get("value") for s, u in zip(load_app().form_settings(), restored, strict=False)}
        assert values["method"] == "lora-over-mpor" and values["select_split"] == 2 and values["data"] == root
        assert values["max_steps"] == 100_000 and restored[-1]["value"] == root
        table = {row[0]: row for row in client.predict(api_name="/refresh")[6]["data"]}
        assert table[job["run"]][4] == "training"
    finally:
        assert client.predict(api_name="/stop_training")[3]["state"] == "stopping"
        job = wait_until_ended(client)
    assert job["state"] == "stopped" and 2 <= job["step"] < 100_000
    stopped_dir = server.out / job["run"]  # its LoRA so far, named partial: never mistaken for a finished run's
    assert not (stopped_dir / "lora.safetensors").exists()
    assert (stopped_dir / f"lora-partial-step{job['step']}.safetensors").is_file()
    table = {row[0]: row for row in client.predict(api_name="/refresh")[6]["data"]}
    assert table[job["run"]][4] == "stopped"

    stopped_at = job["step"]
    client.predict(job["run"], stopped_at + 2, api_name="/resume_training")
    resumed = wait_until_ended(client)
    assert resumed["state"] == "finished" and resumed["run"] == job["run"]
    assert resumed["step"] == resumed["total"] == stopped_at + 2
    losses = client.predict(api_name="/status")[1]["data"]
    assert [row[0] for row in losses if row[2] == "raw"] == list(range(1, stopped_at + 3))
    assert client.predict(api_name="/restore_form")[0] == {"__type__": "update"}  # nothing running: no change


def test_a_run_that_fails_at_start_shows_its_error_and_leaves_no_folder(client, dataset, server):
    before = {p.name for p in server.out.iterdir()}
    client.predict(data="Shapes", base="/no/such/model", max_steps=2, api_name="/start_training")
    job = wait_until_ended(client)
    assert job["state"] == "failed" and "could not load an SDXL base model" in job["error"]
    assert "(nothing was saved)" in job["error"] and not job["error"].startswith("ValueError")
    assert {p.name for p in server.out.iterdir()} == before


def test_compare_puts_each_model_in_its_column_and_each_prompt_and_seed_in_its_row(client, run, second_run):
    prompts = ["a painting of a purple circle, opdiff style", "a red square"]
    slider, grid, png = client.predict([run.name, second_run.name], "\n".join(prompts), "0 1", 2, api_name="/compare")
    assert slider["visible"] is False  # the slider is for two models
    table = _parse_grid(grid)
    columns = ["base", run.name, second_run.name]
    assert table.header == ["prompt and seed", *columns]
    assert table.rows == [f"seed {s}: {p}" for p in prompts for s in (0, 1)]
    assert [(c["column"], c["row"]) for c in table.cells] == [(col, row) for row in table.rows for col in columns]
    for cell in table.cells:
        assert cell["title"] == f"{cell['column']}: {cell['row']}"
    images = {(c["column"], c["row"]): _open(c["src"].removeprefix("gradio_api/file=")) for c in table.cells}
    first = table.rows[0]
    assert not np.array_equal(images[("base", first)], images[(run.name, first)])
    assert not np.array_equal(images[(run.name, first)], images[(run.name, table.rows[1])])  # seeds differ
    assert Path(png).is_file()

    slider, _, _ = client.predict([run.name], prompts[0], "0", 2, api_name="/compare")
    base, adapted = (_open(p) for p in slider["value"])
    assert base.shape == adapted.shape and not np.array_equal(base, adapted)
    np.testing.assert_array_equal(adapted, images[(run.name, first)])  # the same noise for the same seed
    with pytest.raises(AppError, match="no run named"):
        client.predict(["../etc"], "", "0", 2, api_name="/compare")


def test_the_evaluate_tab_says_which_clip_is_available(empty_caches):
    app = load_app().App(empty_caches)
    text, choice = app.clip_status()
    assert "not on this machine" in text and "HF_HUB_OFFLINE" in text and choice["value"] == "demo"
    assert len(text) < 600


def test_evaluate_keeps_a_score_per_clip_images_and_steps_with_the_difference_to_the_base(client, run):
    text, choice = client.predict(api_name="/clip_status")
    assert "bundled demo CLIP" in text
    scores, message = client.predict([run.name], "demo", "", 2, 2, True, api_name="/evaluate")
    assert "Scored 1 run(s) with CLIP bundled demo CLIP." == message
    assert scores["headers"] == ["run", "method", "CLIP", "images", "steps", "CMMD", "base CMMD", "vs base", "note"]
    (row,) = [r for r in scores["data"] if r[0] == run.name]
    assert row[1:5] == ["lora", "bundled demo CLIP", 2, 2] and row[5] >= 0 and row[6] >= 0
    assert row[7] == pytest.approx(row[5] - row[6], abs=2e-3)
    assert row[8] == "not comparable to published CMMD"

    scores, message = client.predict([run.name], "demo", "", 2, 1, False, api_name="/evaluate")
    assert sorted(r[3] for r in scores["data"] if r[0] == run.name) == [1, 2]  # the other score is kept
    assert "replaced" not in message
    scores, message = client.predict([run.name], "demo", "", 2, 1, False, api_name="/evaluate")
    assert "replaced the earlier score of " + run.name in message
    assert sorted(r[3] for r in scores["data"] if r[0] == run.name) == [1, 2]
    assert {r[0]: r[5] for r in client.predict(api_name="/refresh")[6]["data"]}[run.name] != "-"  # CMMD listed

    with pytest.raises(AppError, match="weights are not at /no/such/clip.safetensors") as missing:
        client.predict([run.name], "reference", "/no/such/clip.safetensors", api_name="/evaluate")
    assert "--clip-checkpoint" not in str(missing.value) and len(str(missing.value)) < 300


def test_exported_files_load_into_a_fresh_pipeline(client, run, bundled_model):
    """Both formats, as downloaded, load with `load_lora_weights` and give the same images, unlike the base."""
    files, usage = client.predict(run.name, "both", "fp32", api_name="/export")
    diffusers_file, kohya_file = map(Path, files)
    assert kohya_file.name.endswith("_kohya.safetensors")
    trained = load_file(run / "lora.safetensors")
    downloaded = load_file(diffusers_file)
    assert downloaded.keys() == trained.keys() and all(torch.equal(downloaded[k], trained[k]) for k in trained)
    assert any(k.startswith("lora_unet_") for k in load_file(kohya_file))
    # Each file: the programs it is for, then how to use it there, with the LoRA scale.
    assert f"**{diffusers_file.name}**: for diffusers: pipe.load_lora_weights(file); exact." in usage
    assert f"pipe.load_lora_weights('{diffusers_file.name}', adapter_name=\"opdiff\")" in usage
    assert 'pipe.set_adapters("opdiff", adapter_weights=1.0)' in usage and "LoRA scale (strength) 1.0" in usage
    assert f"**{kohya_file.name}**: for ComfyUI, AUTOMATIC1111, Forge, sd-scripts" in usage
    assert f"<lora:{kohya_file.stem}:1>" in usage and "ComfyUI/models/loras/" in usage
    files, usage = client.predict(run.name, "kohya", "fp16", api_name="/export")
    assert [Path(f).name for f in files] == [f"{run.name}-fp16_kohya.safetensors"] and "```python" not in usage

    pipe = load_pipeline(bundled_model, device="cpu")  # fresh: the base model as it is on disk
    base = _render(pipe)
    pipe.load_lora_weights(str(diffusers_file), adapter_name="opdiff")
    pipe.set_adapters("opdiff", adapter_weights=1.0)  # as the snippet does
    from_diffusers = _render(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(kohya_file))
    np.testing.assert_allclose(_render(pipe), from_diffusers, atol=1e-5)
    assert not np.allclose(base, from_diffusers, atol=1e-3)


def test_runs_are_deleted_from_the_list(client, server, dataset, run):
    doomed = server.out / "doomed-run"
    (doomed).mkdir()
    (doomed / "config.json").write_bytes((run / "config.json").read_bytes())
    *_, runs, _, message = client.predict("doomed-run", api_name="/delete_run")
    assert not doomed.exists() and "Deleted doomed-run" in message
    assert "doomed-run" not in [row[0] for row in runs["data"]]
    with pytest.raises(AppError, match="no run named"):
        client.predict("../datasets", api_name="/delete_run")


def test_the_glue_endpoints_answer_as_the_page_uses_them(client, run, dataset):
    """The endpoints behind the method list, the dataset pickers and the next-step and runs-list buttons."""
    method, setting = _method_with_settings()
    *visible, about = client.predict(method, api_name="/method_changed")
    own = [s for s in load_app().form_settings() if s.read_by is not None]
    assert {s.name for s, u in zip(own, visible, strict=True) if u["visible"]} == {
        s.name for s in own if method in s.read_by}
    assert about.startswith(load_app().jobs.method_about(method)[0])
    picker, preset_about = client.predict(api_name="/presets")
    assert picker["visible"] is True and "cpu-quick" in [c[1] if isinstance(c, list) else c for c in picker["choices"]]
    with pytest.raises(AppError, match="unknown preset 'fast'"):
        client.predict("fast", api_name="/apply_preset")
    root = dataset[0][0]["value"]
    assert client.predict(root, api_name="/dataset_to_training") == root
    assert client.predict(root, api_name="/training_to_dataset") == root
    assert client.predict(run.name, api_name="/compare_run")["value"] == [run.name]
    assert client.predict(run.name, api_name="/export_run")["value"] == run.name
    lists = client.predict(root, [], [], None, None, api_name="/go_results")
    assert run.name in [row[0] for row in lists[6]["data"]] and lists[0]["value"] == root
    assert client.predict(api_name="/go_train") == ()  # it only switches the tab


def test_compare_and_evaluate_report_progress_per_image(server, run):
    app = load_app().App(server.out)
    calls = []

    def progress(value, desc=None, **_):
        calls.append((value, desc))

    app.compare([run.name], "a\nb", "0 1", 1, progress=progress)
    assert [c[0] for c in calls[1:]] == [(k, 8) for k in range(1, 9)]  # 2 prompts x 2 seeds x 2 models
    assert calls[-1][1] == "rendering image 8 of 8"
    calls.clear()
    app.evaluate([run.name], "demo", None, 1, 2, True, progress=progress)
    assert [c[0] for c in calls[1:]] == [(k, 4) for k in range(1, 5)]  # 2 captions, adapted and base
    assert calls[-1][1] == f"{run.name}: image 4 of 4"


def test_a_very_large_image_is_added_with_a_notice(client, tmp_path):
    root = client.predict("Large", api_name="/create_dataset")[0]["value"]
    wide = tmp_path / "wide.png"
    Image.new("RGB", (jobs.LARGE_IMAGE_SIDE + 8, 40), "red").save(wide)
    *_, message, _ = client.predict(root, [handle_file(wide)], "", api_name="/add_files")
    assert "Added 1 image(s)" in message
    assert f"`wide.png`: {jobs.LARGE_IMAGE_SIDE + 8}x40 pixels: used, and scaled down" in message


def test_presets_fill_the_form(tmp_path, monkeypatch):
    app = load_app().App(tmp_path)
    picker, about = app.presets()
    assert picker["visible"] is True and "cpu-quick" in picker["choices"]  # the shipped presets
    monkeypatch.setattr(jobs, "list_presets", lambda: [])
    picker, about = app.presets()
    assert picker["visible"] is False and about["visible"] is False  # none: hidden
    method, setting = _method_with_settings()
    preset = presets.Preset("Quick test", "Few steps, to see that everything works.",
                            {"method": method, "max_steps": 10, setting.name: setting.default + 3})
    monkeypatch.setattr(jobs, "list_presets", lambda: [preset])
    picker, about = app.presets()
    assert picker["visible"] is True and picker["choices"] == ["Quick test"]
    updates = app.apply_preset("Quick test")
    form = {s.name: u for s, u in zip(load_app().form_settings(), updates, strict=False)}
    assert form["method"]["value"] == method and form["max_steps"]["value"] == 10
    assert form[setting.name] == {"__type__": "update", "visible": True, "value": setting.default + 3}
    assert "value" not in form["data"]  # the dataset on view stays
    assert updates[-1]["value"] == preset.description
    with pytest.raises(load_app().gr.Error, match="unknown preset"):
        app.apply_preset("nope")


def test_every_event_has_an_api_name(server):
    config = httpx.get(f"{server.url}config").json()
    unnamed = [d for d in config["dependencies"] if d.get("js") is None and not d.get("api_name")]
    assert not unnamed, unnamed


def test_uploads_over_the_limit_and_unsafe_zips_are_refused(client, server, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MAX_UPLOAD_MB * 2**20 + 1))
    with big.open("rb") as f:
        response = httpx.post(f"{server.url}gradio_api/upload", files={"files": ("big.png", f)})
    assert response.status_code == 413

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escaped.txt", "x")
        z.writestr("a.png", _png_bytes())
    root = client.predict("Evil", api_name="/create_dataset")[0]["value"]
    _, _, upload, _, _, rejected, message, _ = client.predict(root, [handle_file(evil)], "", api_name="/add_files")
    assert "Nothing was added" in message and upload is None
    assert rejected["data"][0][0] == "evil.zip"
    assert "refusing to extract evil.zip" in rejected["data"][0][1] and "outside" in rejected["data"][0][1]
    assert not (server.out.parent / "escaped.txt").exists() and not list(server.out.rglob("escaped.txt"))


def test_only_what_the_page_hands_out_is_served(client, server, run, dataset):
    """Runs and datasets in the output folder are not served (checkpoints, settings, the user's images), nor
    anything outside it; a file the page offers for download is."""
    dataset = Path(dataset[0][0]["value"])
    assert (dataset / "demo_00.png").is_file()
    for path in (run / "config.json", run / "checkpoint.pt", run / "lora.safetensors", dataset / "demo_00.png",
                 dataset / "demo_00.txt", "/etc/passwd", REPO / "app.py", REPO / "assets" / "demo-data" / "demo_00.txt"):
        assert httpx.get(f"{server.url}gradio_api/file={path}").status_code == 403, path
    files, _ = client.predict(run.name, "diffusers", "fp32", api_name="/export")
    assert load_file(files[0]).keys() == load_file(run / "lora.safetensors").keys()  # downloaded through the server


def test_defaults_bind_localhost_and_disable_analytics_and_opdiff_app_runs_app_py(monkeypatch):
    app = load_app()
    args = app.build_parser().parse_args([])
    assert args.host is None and args.port is None and args.output_dir == Path("runs")
    for var in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert app.resolve_address() == ("127.0.0.1", 7860)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert app.resolve_address() == ("0.0.0.0", 7999)
    assert app.resolve_address("127.0.0.1", 9) == ("127.0.0.1", 9)  # flags win
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert vars(app.build_parser("opdiff-app").parse_args(["--port", "9", "--output-dir", "x"])) == {
        "host": None, "port": 9, "output_dir": Path("x"), "max_upload_mb": 500, "auth": None}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["opdiff-app"] == "app:main"  # the packages never import the GUI; the entry point does


def test_python_app_py_serves_on_gradio_server_port(tmp_path):
    """`GRADIO_SERVER_PORT=7937 python app.py` serves on 127.0.0.1:7937."""
    env = {**os.environ, "GRADIO_SERVER_PORT": "7937", "HF_HUB_OFFLINE": "1"}
    env.pop("GRADIO_SERVER_NAME", None)
    server = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--output-dir", str(tmp_path / "runs")],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get("http://127.0.0.1:7937/config", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline, "the app did not start on 127.0.0.1:7937"
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)


class _Grid(html.parser.HTMLParser):
    """The compare grid's header, row labels and cells (column, row, title, image source)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.header: list[str] = []
        self.rows: list[str] = []
        self.cells: list[dict] = []
        self._in: str | None = None
        self._head = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "thead":
            self._head = True
        elif tag == "th":
            self._in = "header" if self._head else "row"
            (self.header if self._head else self.rows).append("")
        elif tag == "td":
            self.cells.append({"column": attrs["data-column"], "row": attrs["data-row"]})
        elif tag == "img":
            self.cells[-1].update(src=attrs["src"], title=attrs["title"])
        elif tag == "span":
            self._in = None  # the method under a column title

    def handle_endtag(self, tag):
        if tag == "thead":
            self._head = False
        if tag == "th":
            self._in = None

    def handle_data(self, data):
        if self._in == "header":
            self.header[-1] += data
        elif self._in == "row":
            self.rows[-1] += data


def _parse_grid(text: str) -> _Grid:
    return _Grid(text)


def _open(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _render(pipe) -> np.ndarray:
    """One 2-step image (H, W, 3) in [0, 1], from seed 0."""
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe("a painting, opdiff style", num_inference_steps=2, generator=generator, output_type="np").images[0]


def test_login_is_asked_for_when_set(tmp_path):
    demo = load_app().serve(tmp_path / "out", port=free_port(), block=False, auth=("ada", "s3cret pass"))
    try:
        assert httpx.get(f"{demo.local_url}config").status_code == 401
        assert httpx.get(f"{demo.local_url}gradio_api/info").status_code == 401
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own types for a refused login
            Client(demo.local_url, verbose=False, auth=("ada", "wrong"))
        client = Client(demo.local_url, verbose=False, auth=("ada", "s3cret pass"))
        assert client.predict(api_name="/status")[3]["state"] == "idle"
    finally:
        demo.close()


def test_a_login_comes_from_the_flag_or_the_environment_and_exposure_without_one_warns(monkeypatch, capsys):
    app = load_app()
    assert app.parse_auth("ada:pa:ss") == ("ada", "pa:ss") and app.parse_auth("") is None
    with pytest.raises(ValueError, match="a login must be USER:PASSWORD"):
        app.parse_auth("ada")
    served = []
    monkeypatch.setattr(app, "serve", lambda *args, **kwargs: served.append(kwargs["auth"]))
    monkeypatch.setenv(app.AUTH_ENV, "env:pw")
    assert app.main([]) == 0 and app.main(["--auth", "flag:pw"]) == 0
    assert served == [("env", "pw"), ("flag", "pw")]

    for host in ("127.0.0.1", "localhost", "::1"):
        assert app.exposure_warning(host, None) is None
    assert app.exposure_warning("0.0.0.0", ("a", "b")) is None
    for host in ("0.0.0.0", "192.168.1.5", "my-machine"):
        warning = app.exposure_warning(host, None)
        assert warning.startswith(f"WARNING: serving on {host} without a login") and "--auth USER:PASSWORD" in warning


def test_optional_number_boxes_show_empty_and_an_empty_box_means_the_default():
    app = load_app()
    optional = [s for s in app.form_settings()
                if s.optional and s.item_type in (int, float) and s.allowed is None and not s.is_list]
    assert optional
    for s in optional:
        widget = app._widget(s)
        assert widget.value is None and widget.placeholder  # without a placeholder gradio shows None as 0
        assert app._shown(s, None) is None
        assert "0 or empty" not in widget.info
    cfg = app._config_from_form({s.name: None for s in optional}).to_dict()
    assert {s.name: cfg[s.name] for s in optional} == {s.name: None for s in optional}
    # gradio draws an empty number box with a 0: the page empties those where 0 is not a value of the setting
    optional = app._optional_numbers()
    emptied = app._emptied(*[0] * len(optional))
    assert emptied == [{"__type__": "update", **({"value": None} if app._means_empty(s, 0) else {})} for s in optional]
    assert any("value" in u for u in emptied)
    # a box holding a value is left alone, never sent back: that could undo what a person typed meanwhile
    assert app._emptied(*[7] * len(optional)) == [{"__type__": "update"}] * len(optional)
    assert app._zero_is_empty(0, 5, None) == [{"__type__": "update", "value": None}, {"__type__": "update"},
                                              {"__type__": "update", "value": None}]


def test_mpop_picks_a_finished_lora_run_to_score_and_trains_from_it(client, run, server):
    """The scoring-LoRA field offers the finished plain-LoRA runs (lora-over.txt Alg. 2: score a trained LoRA,
    then train the chosen structure from the base); the run it starts chooses its layers before step 1."""
    app = load_app()
    picker = app.App(server.out).scoring_runs()
    assert (f"{run.name} (lora, {TRAIN_STEPS} steps)", str(run)) in picker["choices"]
    widget = app._widget(next(s for s in app.form_settings() if s.picks == "run"))
    assert isinstance(widget, app.gr.Dropdown) and widget.allow_custom_value  # any LoRA file may be typed too
    job = client.predict(data="Shapes", method="lora-over-mpop", select_from=str(run), max_steps=2, lr=1e-2,
                         api_name="/start_training")[3]
    job = wait_until_ended(client)
    assert job["state"] == "finished" and job["method"] == "lora-over-mpop", job
    events = RunDir(server.out / job["run"]).read_events()
    assert events and {e["step"] for e in events} == {0}
