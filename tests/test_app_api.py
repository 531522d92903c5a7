"""The GUI driven through its API with gradio_client, as a script would: upload -> train -> compare -> evaluate ->
export, the refusal of a second run, clean stops, and the security limits (upload size, zip paths, served files,
login).

One app per module, served from a thread on a free port, over a fresh output folder.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
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

from pipelines.model import load_pipeline

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


def wait_until_ended(client: Client, timeout: float = 60) -> dict:
    """Poll /status until the job is no longer running; return its raw status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.predict(api_name="/status")[3]
        if job["state"] not in ("starting", "training", "stopping"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"run still going after {timeout} s: {job}")


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


@pytest.fixture(scope="module")
def uploaded(client, bundled_data, tmp_path_factory) -> tuple:
    """Four demo images with captions, a corrupt PNG and an empty WEBP, uploaded together."""
    junk = tmp_path_factory.mktemp("junk")
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (junk / "empty.webp").write_bytes(b"")
    files = []
    for image in sorted(bundled_data.glob("*.png"))[:4]:
        files += [handle_file(image), handle_file(image.with_suffix(".txt"))]
    files += [handle_file(junk / "broken.png"), handle_file(junk / "empty.webp")]
    return client.predict(files, api_name="/upload_dataset")


@pytest.fixture(scope="module")
def run(client, uploaded, server) -> Path:
    """A finished LoRA run on the uploaded dataset, started through the API."""
    dataset = uploaded[0]["value"]
    job = client.predict(data=dataset, max_steps=TRAIN_STEPS, lr=1e-2, api_name="/start_training")[3]
    assert job["state"] in ("starting", "training") and job["method"] == "lora"
    job = wait_until_ended(client)
    assert job["state"] == "finished", job
    return server.out / job["run"]


def test_upload_keeps_usable_images_and_lists_rejected_files_with_reasons(uploaded, server):
    dataset, _, gallery, table, rejected, message = uploaded
    root = Path(dataset["value"])
    assert root.parent == server.out / "datasets"  # uploads live in the output folder
    assert [row[0] for row in table["data"]] == [f"demo_0{i}.png" for i in range(4)]
    assert all("opdiff style" in row[1] for row in table["data"])
    assert len(gallery) == 4
    reasons = dict(map(tuple, rejected["data"]))
    assert set(reasons) == {"broken.png", "empty.webp"}
    assert "not a readable image" in reasons["broken.png"] and "empty file" in reasons["empty.webp"]
    assert "4 usable image(s), 2 file(s) rejected" in message


def test_loose_images_without_captions_get_an_empty_one_to_fill_in(client, bundled_data):
    image = sorted(bundled_data.glob("*.png"))[5]
    _, _, _, table, rejected, message = client.predict([handle_file(image)], api_name="/upload_dataset")
    assert table["data"] == [[image.name, ""]] and rejected["data"] == []
    assert "1 image(s) have no caption yet" in message


def test_captions_are_editable(client, uploaded):
    dataset = uploaded[0]["value"]
    rows = uploaded[3]["data"]
    edited = {"headers": ["file", "caption"], "data": [[rows[0][0], "  a new caption  "], *rows[1:]]}
    _, table, _, message = client.predict(dataset, edited, api_name="/save_captions")
    assert table["data"][0] == [rows[0][0], "a new caption"]
    assert (Path(dataset) / "demo_00.txt").read_text() == "a new caption"
    assert message.startswith("Captions saved.")
    with pytest.raises(AppError, match="is not an image of dataset"):
        client.predict(dataset, {"headers": ["file", "caption"], "data": [["../x.png", "no"]]},
                       api_name="/save_captions")


def test_training_reports_progress_and_writes_the_run(run, client):
    _, losses, _, job = client.predict(api_name="/status")  # the client leaves out the buttons' updates
    assert job["run"] == run.name and job["step"] == job["total"] == TRAIN_STEPS
    assert [row[0] for row in losses["data"]] == list(range(1, TRAIN_STEPS + 1))
    assert (run / "lora.safetensors").is_file()
    assert json.loads((run / "config.json").read_text())["dataset"]["images"] == 4
    choices = [value for _, value in client.predict(api_name="/refresh")[4]["choices"]]
    assert choices == [run.name]  # finished runs are offered for compare, evaluate and export


def test_run_lifecycle_refusal_selection_log_stop_and_resume(client, uploaded, server):
    """A second start is refused while a run is going; MPOR's selection log is shown; Stop ends the run cleanly
    (it exports what it learned); Resume continues it to a new max_steps with one unbroken loss curve."""
    dataset = uploaded[0]["value"]
    mpor = {"method": "lora-over-mpor", "select_every": 1, "select_top_n": 2, "select_split": 2}
    client.predict(data=dataset, max_steps=100_000, api_name="/start_training", **mpor)
    try:
        with pytest.raises(AppError, match="a run is already in progress"):
            client.predict(data=dataset, max_steps=5, api_name="/start_training")
        deadline = time.monotonic() + 30
        while (status := client.predict(api_name="/status"))[3]["step"] < 2:
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        selected = status[2]["value"]  # the table is an update that also makes it visible
        assert status[2]["visible"] and selected["headers"] == ["step", "group", "layer", "matrix", "score"]
        assert len(selected["data"]) >= 8  # one matrix per group (4 module kinds x A/B) per round
    finally:
        assert client.predict(api_name="/stop_training")[3]["state"] == "stopping"
        job = wait_until_ended(client)
    assert job["state"] == "stopped" and 2 <= job["step"] < 100_000
    stopped_dir = server.out / job["run"]  # its LoRA so far, named partial: never mistaken for a finished run's
    assert not (stopped_dir / "lora.safetensors").exists()
    assert (stopped_dir / f"lora-partial-step{job['step']}.safetensors").is_file()
    offered = {value: label for label, value in client.predict(api_name="/refresh")[4]["choices"]}  # its partial LoRA
    assert offered[job["run"]].endswith(f"(lora-over-mpor, {job['step']} of 100000 steps, partial)")

    stopped_at = job["step"]
    client.predict(job["run"], stopped_at + 2, api_name="/resume_training")
    resumed = wait_until_ended(client)
    assert resumed["state"] == "finished" and resumed["run"] == job["run"]
    assert resumed["step"] == resumed["total"] == stopped_at + 2
    losses = client.predict(api_name="/status")[1]["data"]
    assert [row[0] for row in losses] == list(range(1, stopped_at + 3))


def test_a_run_that_fails_shows_its_error(client, uploaded):
    client.predict(data=uploaded[0]["value"], base="/no/such/model", max_steps=2, api_name="/start_training")
    job = wait_until_ended(client)
    assert job["state"] == "failed" and "could not load an SDXL base model" in job["error"]


def test_compare_shows_base_and_run_on_the_same_seed(client, run):
    slider, gallery, grid = client.predict([run.name], "a painting, opdiff style", "0 1", 2, api_name="/compare")
    base, adapted = (np.asarray(_open(p)) for p in slider["value"])
    assert base.shape == adapted.shape and not np.array_equal(base, adapted)
    assert [item["caption"].split(" | ")[0] for item in gallery] == ["base", run.name] * 2
    assert Path(grid).is_file()
    with pytest.raises(AppError, match="no run named"):
        client.predict(["../etc"], "", "0", 2, api_name="/compare")


def test_evaluate_with_the_demo_clip_labels_the_score(client, run):
    scores, message = client.predict([run.name], "demo", "", 2, 2, False, api_name="/evaluate")
    (row,) = scores["data"]
    assert row[0] == run.name and row[1] == "lora" and row[2] >= 0 and row[4] == 2
    assert row[6].startswith("note: the bundled demo CLIP") and "not comparable to published CMMD" in message
    with pytest.raises(AppError, match="CLIP checkpoint file not found"):
        client.predict([run.name], "reference", "/no/such/clip.safetensors", api_name="/evaluate")


def test_exported_files_load_into_a_fresh_pipeline(client, run, bundled_model):
    """Both formats, as downloaded, load with `load_lora_weights` and give the same images, unlike the base."""
    files, snippet = client.predict(run.name, "both", "fp32", api_name="/export")
    diffusers_file, kohya_file = map(Path, files)
    assert kohya_file.name.endswith("_kohya.safetensors")
    trained = load_file(run / "lora.safetensors")
    downloaded = load_file(diffusers_file)
    assert downloaded.keys() == trained.keys() and all(torch.equal(downloaded[k], trained[k]) for k in trained)
    assert any(k.startswith("lora_unet_") for k in load_file(kohya_file))
    assert f"load_lora_weights('{diffusers_file.name}')" in snippet
    # The note says which program each file is for, as its header does.
    assert f"# {diffusers_file.name}: for diffusers: pipe.load_lora_weights(file); exact" in snippet
    assert f"# {kohya_file.name}: for ComfyUI, AUTOMATIC1111, Forge, sd-scripts" in snippet

    pipe = load_pipeline(bundled_model, device="cpu")  # fresh: the base model as it is on disk
    base = _render(pipe)
    pipe.load_lora_weights(str(diffusers_file))
    from_diffusers = _render(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(kohya_file))
    np.testing.assert_allclose(_render(pipe), from_diffusers, atol=1e-5)
    assert not np.allclose(base, from_diffusers, atol=1e-3)


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
    _, _, _, _, rejected, message = client.predict([handle_file(evil)], api_name="/upload_dataset")
    assert "Upload refused" in message and "refusing to extract evil.zip" in message and "outside" in message
    assert rejected["data"][0][0] == "evil.zip"
    assert not (server.out.parent / "escaped.txt").exists() and not list(server.out.rglob("escaped.txt"))


def test_only_what_the_page_hands_out_is_served(client, server, run, uploaded):
    """Runs and datasets in the output folder are not served (checkpoints, settings, the user's images), nor
    anything outside it; a file the page offers for download is."""
    dataset = Path(uploaded[0]["value"])
    for path in (run / "config.json", run / "checkpoint.pt", run / "lora.safetensors", dataset / "demo_00.png",
                 dataset / "demo_00.txt", "/etc/passwd", REPO / "app.py", REPO / "assets" / "demo-data" / "demo_00.txt"):
        assert httpx.get(f"{server.url}gradio_api/file={path}").status_code == 403, path
    files, _ = client.predict(run.name, "diffusers", "fp32", api_name="/export")
    assert load_file(files[0]).keys() == load_file(run / "lora.safetensors").keys()  # downloaded through the server


def test_defaults_bind_localhost_and_disable_analytics_and_opdiff_app_runs_app_py():
    app = load_app()
    args = app.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.output_dir == Path("runs")
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert vars(app.build_parser("opdiff-app").parse_args(["--port", "9", "--output-dir", "x"])) == {
        "host": "127.0.0.1", "port": 9, "output_dir": Path("x"), "max_upload_mb": 500, "auth": None}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["opdiff-app"] == "app:main"  # the packages never import the GUI; the entry point does


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
