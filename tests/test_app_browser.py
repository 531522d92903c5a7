"""The GUI in a real browser (Debian's Chromium, headless, through Playwright): upload the demo images, train,
watch the progress, reload the page and find the same run still going, stop it, compare, evaluate and download
the export; and the refusals a user sees in the page (upload too large, unsafe zip).

Every tab is saved as a screenshot under the test's tmp folder.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_app_api import free_port, load_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_UPLOAD_MB = 0.1
STEP = re.compile(r"step (\d+) / (\d+)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("app-runs")
    demo = load_app().serve(out, port=free_port(), max_upload_mb=MAX_UPLOAD_MB, block=False)
    yield demo.local_url, out
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app; requests that leave the machine are recorded and blocked (the app works offline)."""
    url = server[0]
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.outside = []

    def route(r):
        if r.request.url.startswith((url, "data:", "blob:")):
            r.continue_()
        else:
            page.outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.set_default_timeout(30_000)
    page.goto(url)
    wait_until_loaded(page)
    yield page
    assert page.outside == [], "the page tried to reach other hosts"
    context.close()


def wait_until_loaded(page) -> None:
    """Wait for the page's load events (run and dataset lists, the dataset on view) to have finished."""
    page.locator("#dataset-message").filter(has_text="usable image").wait_for()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def shot(page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def progress(page) -> tuple[str, int]:
    """The run's name and step as the Train tab shows them (waits until a step is shown)."""
    status = page.locator("#job-status")
    status.filter(has_text=STEP).wait_for()
    text = status.inner_text()
    return re.search(r"\b(\S+-\d{8}-\d{6}(?:-\d+)?)\b", text).group(1), int(STEP.search(text).group(1))


def wait_for_step_above(page, step: int, timeout: float = 30) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run, now = progress(page)
        if now > step:
            return run, now
        time.sleep(0.2)
    raise AssertionError(f"training stuck at step {step}")


def choose(page, dropdown: str, option: str) -> None:
    """Pick `option` (a substring of its label) in the gradio dropdown with elem_id `dropdown`."""
    page.locator(f"#{dropdown} input").click()
    page.get_by_role("option", name=re.compile(re.escape(option))).click()
    page.keyboard.press("Escape")


def test_upload_train_reload_stop_compare_evaluate_export(page, server, bundled_data, tmp_path):
    files = []
    for image in sorted(bundled_data.glob("*.png"))[:4]:
        files += [image, image.with_suffix(".txt")]
    page.locator("#upload input[type=file]").set_input_files(files)
    page.locator("#dataset-message").filter(has_text=re.compile(r"upload-[\d-]+: 4 usable image")).wait_for()
    assert page.locator("#captions").get_by_text("a painting of a purple circle").count() == 1
    assert page.locator("#view-dataset input").input_value().startswith("upload-")
    shot(page, tmp_path, "1-dataset")

    open_tab(page, "Train")
    assert "upload-" in page.locator("#field-data input").input_value()  # the upload is selected for training
    page.get_by_text("Method settings").click()  # open the accordion: only the chosen method's settings are in it
    assert not page.locator("#field-op_width").is_visible()
    choose(page, "field-method", "op-lora: OP-LoRA")
    page.locator("#field-op_width").wait_for(state="visible")
    assert not page.locator("#field-select_every").is_visible()
    choose(page, "field-method", "lora: LoRA")
    page.locator("#field-op_width").wait_for(state="hidden")
    page.locator("#field-max_steps input").fill("100000")
    page.locator("#field-lr input").fill("0.01")
    page.click("#start")
    run, first = progress(page)
    _, later = wait_for_step_above(page, first)
    shot(page, tmp_path, "2-train")

    page.reload()
    wait_until_loaded(page)
    open_tab(page, "Train")
    same_run, after_reload = wait_for_step_above(page, later)
    assert same_run == run  # the run lives in the server, not in the page
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for()
    shot(page, tmp_path, "3-train-after-reload")
    page.click("#stop")
    page.locator("#job-status").filter(has_text="stopped").wait_for()
    shot(page, tmp_path, "4-train-stopped")

    open_tab(page, "Compare")
    choose(page, "compare-runs", run)
    page.locator("#compare-steps input").fill("2")
    page.locator("#compare-prompts textarea").fill("a painting of a purple circle, opdiff style")
    page.click("#render")
    page.locator("#slider img").nth(1).wait_for()
    shot(page, tmp_path, "5-compare")

    open_tab(page, "Evaluate")
    choose(page, "eval-runs", run)
    page.get_by_label("bundled demo CLIP", exact=False).check()
    page.locator("#eval-steps input").fill("2")
    page.locator("#eval-limit input").fill("1")
    page.click("#evaluate")
    page.locator("#scores").filter(has_text="demo CLIP").wait_for()
    shot(page, tmp_path, "6-evaluate")

    open_tab(page, "Export")
    page.get_by_label("fp32").check()
    page.click("#export")
    link = page.locator("#export-files a").first
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    (partial,) = (server[1] / run).glob("lora-partial-step*[0-9].safetensors")  # the stopped run's LoRA so far
    assert saved.name == f"{run}{partial.stem.removeprefix('lora')}.safetensors"  # says partial too
    assert load_file(saved).keys() == load_file(partial).keys()
    page.get_by_text("load_lora_weights").first.wait_for()
    shot(page, tmp_path, "7-export")
    _keep_screenshots(tmp_path)


def test_too_large_uploads_and_unsafe_zips_are_refused_in_the_page(page, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * int(MAX_UPLOAD_MB * 2**20 * 2))
    page.locator("#upload input[type=file]").set_input_files(big)
    page.get_by_text(re.compile("exceed|too large|maximum", re.IGNORECASE)).first.wait_for()
    shot(page, tmp_path, "8-too-large")

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.txt", "x")
    page.reload()
    wait_until_loaded(page)
    page.locator("#upload input[type=file]").set_input_files(evil)
    message = page.locator("#dataset-message").filter(has_text="Upload refused")
    message.wait_for()
    assert "refusing to extract evil.zip" in message.inner_text()
    shot(page, tmp_path, "9-unsafe-zip")
    _keep_screenshots(tmp_path)


def _keep_screenshots(folder: Path) -> None:
    """Copy the screenshots where a person can look at them when OPDIFF_SCREENSHOTS names a folder."""
    target = os.environ.get("OPDIFF_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("[0-9]-*.png"):
            shutil.copy(png, Path(target) / png.name)
