"""The GUI in a real browser (Debian's Chromium, headless, through Playwright), walked as a person would: create a
named dataset from images, add a zip to it, fix a caption, train a method that has its own settings and watch its
progress and samples, reload and find the same form and run, train a second run, compare the two (every image
checked against its column and row), evaluate with the bundled demo CLIP, and export both formats (the diffusers
file is loaded with `load_lora_weights`). And the refusals a user sees in the page (upload too large, unsafe zip).

Every step is saved as a screenshot at 1280 and 820 px wide under the test's tmp folder (copied to
$OPDIFF_SCREENSHOTS when set).
"""

from __future__ import annotations

import json
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

from pipelines import jobs
from pipelines.model import load_pipeline

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_UPLOAD_MB = 0.1
WIDTHS = (1280, 820)
STEP = re.compile(r"step (\d+) / (\d+)")
RUN_NAME = re.compile(r"\b(\S+-\d{8}-\d{6}(?:-\d+)?)\b")

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
    context = browser.new_context(viewport={"width": WIDTHS[0], "height": 900}, accept_downloads=True)
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
    """Wait for the page's load events (dataset and run lists, the dataset on view) to have finished."""
    page.locator("#dataset-message").filter(has_text="image(s)").wait_for()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def shots(page, folder: Path, name: str) -> None:
    """Save the whole page at each width as `<name>-<width>.png`, then go back to the first width."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(1000)  # the layout and the plot settle
        page.screenshot(path=str(folder / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": WIDTHS[0], "height": 900})


CONTRAST = """els => els.filter(e => e.offsetParent !== null && e.textContent.trim()).map(e => {
    const rgba = c => { const v = c.match(/[\\d.]+/g).map(Number); return v.length === 4 ? v : [...v, 1]; };
    const lum = ([r, g, b]) => [r, g, b].map(v => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
                                        .reduce((s, v, k) => s + v * [0.2126, 0.7152, 0.0722][k], 0);
    let back = e.parentElement;
    while (back && rgba(getComputedStyle(back).backgroundColor)[3] === 0) back = back.parentElement;
    const text = rgba(getComputedStyle(e).color);
    const ground = back ? rgba(getComputedStyle(back).backgroundColor) : [255, 255, 255, 1];
    const [hi, lo] = [lum(text), lum(ground)].sort((a, b) => b - a);
    return [e.textContent.trim().slice(0, 40), text[3], (hi + 0.05) / (lo + 0.05)];
})"""
"""[text, alpha of its colour, contrast ratio to the nearest background drawn behind it] of each visible element."""

LABEL_FITS = """([id, labels]) => {
    const input = document.querySelector(`#${id} input`);
    if (!input || input.offsetParent === null) return [];  // not on view (another method's, or folded)
    const style = getComputedStyle(input);
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.font = style.font;
    const room = input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    return labels.filter(l => ctx.measureText(l).width > room);
}"""
"""The choices of a dropdown whose label would not fit in its box."""

CELLS = """cells => cells.map(td => { const c = td.getBoundingClientRect(), i = td.querySelector("img"),
                                   r = i.getBoundingClientRect();
    return [c.width, c.height, r.width, r.height, i.naturalWidth / i.naturalHeight]; })"""
"""Per compare cell: its width and height, its image's shown width and height, the image's own aspect ratio."""


def check_layout(page, choices: dict[str, list[str]] | None = None) -> None:
    """At each width: help lines and source notes read at 4.5:1 or more; each dropdown in `choices` (elem_id:
    labels) shows every label uncut; the compare grid's cells, when shown, are square with undistorted images."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(300)
        notes = page.locator(".info-text, .ref").evaluate_all(CONTRAST)
        assert notes, "no help lines on view"
        assert [n for n in notes if n[1] < 1 or n[2] < 4.5] == [], f"help lines too pale at {width} px"
        for field, labels in (choices or {}).items():
            assert page.evaluate(LABEL_FITS, [field, labels]) == [], f"cut in #{field} at {width} px"
        for w, h, iw, ih, ratio in page.locator("#compare-grid tbody td").evaluate_all(CELLS):
            if not (h and ih):  # the grid is on another tab
                continue
            assert abs(w - h) <= 1 and abs(iw / ih - ratio) < 0.01, f"compare cell {w}x{h}, image {iw}x{ih}"
    page.set_viewport_size({"width": WIDTHS[0], "height": 900})


def progress(page) -> tuple[str, int]:
    """The run's name and step as the Train tab shows them (waits until a step is shown)."""
    status = page.locator("#job-status")
    status.filter(has_text=STEP).wait_for()
    text = status.inner_text()
    return RUN_NAME.search(text).group(1), int(STEP.search(text).group(1))


def wait_for_step_above(page, step: int, timeout: float = 30) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run, now = progress(page)
        if now > step:
            return run, now
        time.sleep(0.2)
    raise AssertionError(f"training stuck at step {step}")


def choose(page, dropdown: str, *options: str, multi: bool = False) -> None:
    """Pick `options` (substrings of their labels) in the gradio dropdown with elem_id `dropdown`, waiting for each
    to show as chosen (a multiselect shows each as a token, a single one in its box)."""
    box = page.locator(f"#{dropdown}")
    for option in options:
        box.locator("input").click()
        page.get_by_role("option", name=re.compile(re.escape(option))).first.click()
        if multi:
            sync_api.expect(box.locator(".token").filter(has_text=option)).to_have_count(1)
        else:
            sync_api.expect(box.locator("input")).to_have_value(re.compile(re.escape(option)))
    page.keyboard.press("Escape")


def fill(page, field: str, value: object) -> None:
    page.locator(f"#{field} input, #{field} textarea").first.fill(str(value))


def test_the_whole_flow_as_a_person_walks_it(page, server, bundled_data, bundled_model, tmp_path):
    url, out = server
    method, own = _method_with_settings()

    # 1. Dataset: a named dataset from four captioned images, then a zip of two more; fix one caption.
    fill(page, "dataset-name", "Shapes")
    page.click("#create-dataset")
    page.locator("#dataset-message").filter(has_text="Created Shapes").wait_for()
    assert page.locator("#view-dataset input").input_value().startswith("Shapes")
    files = []
    for image in sorted(bundled_data.glob("*.png"))[:4]:
        files += [image, image.with_suffix(".txt")]
    page.locator("#upload input[type=file]").set_input_files(files)
    page.locator("#dataset-message").filter(has_text="Shapes: 4 image(s)").wait_for()
    assert page.locator("#upload input[type=file]").count() == 1  # the box is empty again, ready for more
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for image in sorted(bundled_data.glob("*.png"))[4:6]:
            z.write(image, image.name)
            z.write(image.with_suffix(".txt"), image.with_suffix(".txt").name)
    page.locator("#upload input[type=file]").set_input_files(archive)
    page.locator("#dataset-message").filter(has_text="Shapes: 6 image(s)").wait_for()
    assert "already" not in page.locator("#dataset-message").inner_text()
    page.locator("#thumbnails .thumbnail-item").nth(2).click()  # the third image, chosen by its thumbnail
    sync_api.expect(page.locator("#image input")).to_have_value("demo_02.png")
    caption_file = _dataset_folder(out, "Shapes") / "demo_02.txt"
    sync_api.expect(page.locator("#caption textarea")).to_have_value(caption_file.read_text())  # its caption
    fill(page, "caption", "a red triangle, opdiff style")
    page.click("#save-caption")
    page.locator("#dataset-message").filter(has_text="Caption of demo_02.png saved").wait_for()
    assert caption_file.read_text() == "a red triangle, opdiff style"
    shots(page, tmp_path, "1-dataset")

    # 2. Train: the dataset on view is the one used; a preset when there is one; a method with its own settings.
    page.click("#next-train")
    assert "Shapes" in page.locator("#field-data input").input_value()
    choose(page, "preset", "cpu-quick")  # samples every 8 steps, and the base before the first step
    page.locator("#preset-about").filter(has_text="quick check").wait_for()
    assert not page.locator(f"#field-{own.name}").is_visible()
    choose(page, "field-method", _method_label(method))
    page.locator(f"#field-{own.name}").wait_for(state="visible")
    assert page.locator("#method-about").inner_text().strip()
    fill(page, f"field-{own.name}", own.default + 1)
    fill(page, "field-max_steps", 100_000)
    fill(page, "field-lr", 0.01)
    assert page.locator("#field-resolution input").input_value() == ""  # None shows empty, not 0
    for fold in ("Schedule, accumulation and loss", "Advanced: memory, speed, devices"):
        page.get_by_role("button", name=re.compile(re.escape(fold))).click()
    fill(page, "field-max_grad_norm", 1)
    fill(page, "field-max_grad_norm", "")  # emptied again: means no clipping (None)
    check_layout(page, _choice_fields())
    page.click("#start")
    run, first = progress(page)
    assert page.evaluate("window.scrollY") == 0  # the progress is in view
    page.locator("#samples").get_by_text("step 000000").wait_for(timeout=60_000)  # the base, rendered by training
    assert (out / run / "samples" / "step-000000.png").is_file()
    _, later = wait_for_step_above(page, first)
    config = json.loads((out / run / "config.json").read_text())["train"]
    assert config["max_grad_norm"] is None and config["max_steps"] == 100_000  # the emptied box sent None
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for()
    shots(page, tmp_path, "2-train")
    for fold in ("Captions and images", "Sample images"):  # the other two are open already
        page.get_by_role("button", name=re.compile(re.escape(fold))).click()
    page.locator("#field-gradient_checkpointing").wait_for(state="visible")
    shots(page, tmp_path, "2-train-all-settings")

    # Reload: the same run, the same form.
    page.reload()
    wait_until_loaded(page)
    open_tab(page, "2. Train")
    same_run, _ = wait_for_step_above(page, later)
    assert same_run == run  # the run lives in the server, not in the page
    assert page.locator("#field-method input").input_value() == _method_label(method)
    page.locator(f"#field-{own.name}").wait_for(state="visible")
    assert page.locator(f"#field-{own.name} input").input_value() == str(own.default + 1)
    assert page.locator("#field-max_steps input").input_value() == "100000"
    assert "Shapes" in page.locator("#field-data input").input_value()
    page.locator("#samples").get_by_text("step 000000").wait_for()
    assert page.locator("#field-resolution input").input_value() == ""  # a restored None shows empty too
    captions = page.locator("#samples .thumbnail-item").all_inner_texts()
    assert len(captions) == len(set(captions)) >= 1  # each sample once
    assert page.locator("#samples img").first.evaluate("i => getComputedStyle(i).objectFit") == "contain"
    shots(page, tmp_path, "3-train-after-reload")
    page.click("#stop")
    page.locator("#job-status").filter(has_text="stopped").wait_for()

    # A second run, of the default method, to the end; then the next step is offered.
    choose(page, "field-method", _method_label(load_app().TrainConfig().method))
    fill(page, "field-max_steps", 3)
    page.click("#start")
    page.locator("#job-status").filter(has_text="finished").wait_for(timeout=60_000)
    second = RUN_NAME.search(page.locator("#job-status").inner_text()).group(1)
    page.click("#next-results")
    runs = page.locator("#runs")
    runs.get_by_text(second).wait_for()
    assert re.search(rf"{re.escape(run)}\s+{method}\s+Shapes\s+\d+ / 100000\s+stopped", runs.inner_text())
    assert re.search(rf"{re.escape(second)}\s+\S+\s+Shapes\s+3 / 3\s+finished", runs.inner_text())
    shots(page, tmp_path, "4-runs")
    page.reload()  # Results after a reload: each run listed once, its state as before
    wait_until_loaded(page)
    open_tab(page, "3. Results")
    runs.get_by_text(second).wait_for()
    assert runs.inner_text().count(second) == 1 and runs.inner_text().count(run) == 1
    sync_api.expect(page.locator("#more-steps input")).to_have_value("")  # an unset step count shows empty, not 0

    # 3. Results: compare the two runs on two prompts and two seeds.
    open_tab(page, "Compare")
    sync_api.expect(page.locator("#compare-steps input")).to_have_value("")
    choose(page, "compare-runs", run, second, multi=True)
    fill(page, "compare-steps", 2)
    prompts = ["a painting of a purple circle, opdiff style", "a red square"]
    page.locator("#compare-prompts textarea").fill("\n".join(prompts))
    fill(page, "compare-seeds", "0 1")
    page.click("#render")
    page.locator("#compare-grid img").nth(11).wait_for()
    columns = [t.strip() for t in page.locator("#compare-grid thead th").all_inner_texts()[1:]]
    assert [c.splitlines()[0] for c in columns] == ["base", run, second]
    rows = [t.strip() for t in page.locator("#compare-grid tbody th").all_inner_texts()]
    assert rows == [f"seed {s}: {p}" for p in prompts for s in (0, 1)]
    for r, row in enumerate(page.locator("#compare-grid tbody tr").all()):
        for c, img in enumerate(row.locator("img").all()):
            assert img.get_attribute("title") == f"{columns[c].splitlines()[0]}: {rows[r]}"
            assert img.evaluate("i => i.complete && i.naturalWidth > 0")  # served and decoded
    check_layout(page)
    shots(page, tmp_path, "5-compare")

    # Evaluate with the bundled demo CLIP.
    open_tab(page, "Evaluate")
    assert "CLIP" in page.locator("#clip-note").inner_text()
    choose(page, "eval-runs", second, multi=True)
    page.get_by_label("bundled demo CLIP").check()
    fill(page, "eval-steps", 2)
    fill(page, "eval-limit", 2)
    page.click("#evaluate")
    page.locator("#eval-message").filter(has_text="Scored 1 run(s)").wait_for(timeout=60_000)
    assert page.locator("#scores").get_by_text("bundled demo CLIP").count() >= 1
    shots(page, tmp_path, "6-evaluate")

    # Export both formats; the diffusers file, as downloaded, loads with load_lora_weights.
    open_tab(page, "Export")
    choose(page, "export-run", second)
    page.get_by_label("both").check()
    page.get_by_label("fp32").check()
    page.click("#export")
    links = page.locator("#export-files a")
    links.nth(1).wait_for()
    saved = []
    for k in range(2):
        with page.expect_download() as download:
            links.nth(k).click()
        saved.append(tmp_path / download.value.suggested_filename)
        download.value.save_as(saved[-1])
    assert [p.name for p in saved] == [f"{second}.safetensors", f"{second}_kohya.safetensors"]
    assert load_file(saved[0]).keys() == load_file(out / second / "lora.safetensors").keys()
    page.locator("#usage").get_by_text("load_lora_weights").first.wait_for()
    assert "ComfyUI/models/loras/" in page.locator("#usage").inner_text()
    shots(page, tmp_path, "7-export")
    pipe = load_pipeline(bundled_model, device="cpu")
    pipe.load_lora_weights(str(saved[0]))
    assert pipe.get_active_adapters()

    # Back to 2. Train: MPOP scores a finished plain-LoRA run, picked from the list (lora-over.txt Alg. 2).
    open_tab(page, "2. Train")
    choose(page, "field-method", _method_label("lora-over-mpop"))
    page.locator("#field-select_from").wait_for(state="visible")
    choose(page, "field-select_from", second)
    assert str(out / second) not in page.locator("#field-select_from input").input_value()  # named, not a path
    check_layout(page, _choice_fields())
    shots(page, tmp_path, "10-train-mpop")
    _keep_screenshots(tmp_path)


def test_too_large_uploads_and_unsafe_zips_are_refused_in_the_page(page, server, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * int(MAX_UPLOAD_MB * 2**20 * 2))
    page.locator("#upload input[type=file]").set_input_files(big)
    page.get_by_text(re.compile("exceed|too large|maximum", re.IGNORECASE)).first.wait_for()
    shots(page, tmp_path, "8-too-large")

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.txt", "x")
    page.reload()
    wait_until_loaded(page)
    before = _datasets(server[1])
    page.locator("#upload input[type=file]").set_input_files(evil)
    page.locator("#dataset-message").filter(has_text="Nothing was added").wait_for()
    sync_api.expect(page.locator("#rejected")).to_contain_text("refusing to extract evil.zip")
    assert _datasets(server[1]) == before  # a refused upload leaves no new dataset behind
    shots(page, tmp_path, "9-unsafe-zip")
    _keep_screenshots(tmp_path)


def _method_with_settings():
    setting = next(s for s in load_app().form_settings() if s.read_by and s.item_type is int and s.default)
    return setting.read_by[0], setting


def _method_label(method: str) -> str:
    """How the method list names `method`."""
    app = load_app()
    setting = next(s for s in app.form_settings() if s.name == app.METHOD)
    return dict(zip(setting.allowed, app._choice_labels(setting), strict=True))[method]


def _choice_fields() -> dict[str, list[str]]:
    """elem_id: labels, of every dropdown of the form whose choices carry a help line."""
    app = load_app()
    return {f"field-{s.name}": app._choice_labels(s) for s in app.form_settings() if s.choice_help}


def _dataset_folder(out: Path, name: str) -> Path:
    return next(d.path for d in jobs.list_datasets(out / jobs.DATASETS_DIR) if d.name == name)


def _datasets(out: Path) -> list[tuple[str, int]]:
    return [(d.name, d.images) for d in jobs.list_datasets(out / jobs.DATASETS_DIR)]


def _keep_screenshots(folder: Path) -> None:
    """Copy the screenshots where a person can look at them when OPDIFF_SCREENSHOTS names a folder."""
    target = os.environ.get("OPDIFF_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("[0-9]*-*.png"):
            shutil.copy(png, Path(target) / png.name)
