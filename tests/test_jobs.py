"""What the GUI reads from `pipelines.jobs` and `pipelines.rundir`, without a server: named datasets, refusals in
the user's words, run states from the files, kept scores, samples, loss curves, failed starts."""

from __future__ import annotations

import re
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines import jobs
from pipelines.config import TrainConfig
from pipelines.rundir import RunDir


def _png(path: Path, size: tuple[int, int] = (64, 64), color: str = "red") -> Path:
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def uploads(tmp_path) -> Path:
    """Files as a person uploads them: two captioned images, one without a caption, a broken PNG, a stray file."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    for name, color in (("cat.png", "red"), ("dog.png", "blue"), ("bird.png", "green")):
        _png(folder / name, color=color)
    (folder / "cat.txt").write_text("a red cat")
    (folder / "dog.txt").write_text("a blue dog")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    return folder


def test_named_datasets_are_created_found_renamed_and_deleted(tmp_path):
    root = jobs.create_dataset(tmp_path, "  My   cat ")
    assert root == tmp_path / "my-cat" and jobs.dataset_name(root) == "My cat"
    assert jobs.find_dataset(tmp_path, "My cat") == jobs.find_dataset(tmp_path, "my-cat") == root.resolve()
    assert jobs.find_dataset(tmp_path, str(root)) == root.resolve()
    with pytest.raises(ValueError, match="already exists"):
        jobs.create_dataset(tmp_path, "my CAT")
    with pytest.raises(ValueError, match="give the dataset a name"):
        jobs.create_dataset(tmp_path, " ")
    other = jobs.create_dataset(tmp_path, "My cat 2")
    assert [d.name for d in jobs.list_datasets(tmp_path)] == ["My cat 2", "My cat"]  # newest first

    jobs.rename_dataset(root, "Whiskers")  # the folder stays: runs that trained on it still find it
    assert root.is_dir() and jobs.dataset_name(root) == "Whiskers"
    with pytest.raises(ValueError, match="already exists"):
        jobs.rename_dataset(root, "my cat 2")
    for bad in ("nope", "../etc", "/etc", str(tmp_path.parent)):
        with pytest.raises(ValueError, match="unknown dataset"):
            jobs.find_dataset(tmp_path, bad)

    with pytest.raises(ValueError, match="being trained on"):
        jobs.delete_dataset(other, in_use=other)
    jobs.delete_dataset(other)
    assert not other.exists() and [d.name for d in jobs.list_datasets(tmp_path)] == ["Whiskers"]


def test_uploads_are_added_to_a_dataset_and_refusals_name_the_users_files(tmp_path, uploads):
    root = jobs.create_dataset(tmp_path / "datasets", "pets")
    view = jobs.add_files(root, sorted(uploads.iterdir()))
    assert view.added == 3 and {p.name: c for p, c in view.rows} == {"bird.png": "", "cat.png": "a red cat",
                                                                      "dog.png": "a blue dog"}
    reasons = dict(view.skipped)
    assert set(reasons) == {"broken.png", "notes.pdf"}
    assert reasons["broken.png"] == "not a readable image: the file is damaged or not a PNG, JPEG or WEBP image"
    for reason in reasons.values():  # no server paths, no exception names
        assert "/" not in reason.split("(only")[0] and not re.search(r"\w+(Error|Exception)\b", reason), reason

    # A zip added later joins the same dataset; a name already there is refused, not duplicated.
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(uploads / "cat.png", "pets/cat.png")
        z.write(_png(tmp_path / "fox.png", color="orange"), "pets/fox.png")
        z.writestr("pets/fox.txt", "an orange fox")
    view = jobs.add_files(root, [archive])
    assert view.added == 1 and len(view.rows) == 4
    assert view.skipped == [("more.zip: cat.png", "the dataset already has a file of this name; rename the file "
                             "or remove the other one first")]
    assert jobs.open_dataset(root).skipped == view.skipped  # the last upload's refusals stay on view

    with pytest.raises(jobs.UploadRejected, match="nothing was added") as refused:
        jobs.add_files(root, [uploads / "broken.png"])
    assert refused.value.skipped[0][0] == "broken.png"
    assert len(jobs.open_dataset(root).rows) == 4


def test_very_large_images_are_used_with_a_notice(tmp_path):
    root = jobs.create_dataset(tmp_path, "big")
    wide = _png(tmp_path / "wide.png", size=(jobs.LARGE_IMAGE_SIDE + 8, 64))
    view = jobs.add_files(root, [wide, _png(tmp_path / "small.png")])
    assert view.added == 2
    assert view.notes == [("wide.png", f"{jobs.LARGE_IMAGE_SIDE + 8}x64 pixels: used, and scaled down to the "
                           "training resolution when training (1024 px for SDXL)")]


def test_images_are_removed_and_captions_saved(tmp_path, uploads):
    root = jobs.create_dataset(tmp_path, "pets")
    jobs.add_files(root, [uploads / "cat.png", uploads / "cat.txt", uploads / "dog.png", uploads / "dog.txt"])
    view = jobs.save_captions(root, [("cat.png", "  a cat, opdiff style ")])
    assert dict((p.name, c) for p, c in view.rows)["cat.png"] == "a cat, opdiff style"
    with pytest.raises(ValueError, match="is not an image of dataset 'pets'"):
        jobs.remove_images(root, ["dog.png", "../x.png"])
    assert len(jobs.open_dataset(root).rows) == 2  # nothing removed when one name is wrong
    view = jobs.remove_images(root, ["dog.png"])
    assert [p.name for p, _ in view.rows] == ["cat.png"] and not (root / "dog.txt").exists()


def test_loss_curves_smooth_from_the_first_loss_and_thin_long_runs():
    losses = [(1, 1.0), (2, 0.0), (3, 0.0)]
    rows = jobs.loss_curves(losses, weight=0.5)
    assert [r for r in rows if r[2] == "raw"] == [(1, 1.0, "raw"), (2, 0.0, "raw"), (3, 0.0, "raw")]
    # Bias-corrected EMA: 1, (0.25 / 0.75), (0.125 / 0.875)
    smooth = [r[1] for r in rows if r[2] == "smoothed"]
    assert smooth == pytest.approx([1.0, 1 / 3, 1 / 7])
    long = jobs.loss_curves([(i, 1.0) for i in range(1, 5001)], max_points=100)
    raw = [r[0] for r in long if r[2] == "raw"]
    assert len(raw) <= 101 and raw[0] == 1 and raw[-1] == 5000


def _run_folder(root: Path, name: str, steps: int, total: int, lora: bool = True, checkpoint: bool = True) -> RunDir:
    run = RunDir(root / name)
    run.path.mkdir(parents=True)
    run.write_config({"method": "m", "base": "b", "dataset": {"path": str(root / "data"), "images": 3},
                      "schedule": {"total_steps": total}, "train": {}})
    run.write_losses([0.5] * steps)
    if lora:
        run.lora.write_bytes(b"x")
    if checkpoint:
        run.checkpoint.write_bytes(b"x")
    return run


def test_run_states_come_from_the_files_and_the_job(tmp_path):
    _run_folder(tmp_path, "a", 4, 4)  # finished
    _run_folder(tmp_path, "b", 2, 4)  # stopped
    failed = _run_folder(tmp_path, "c", 2, 4)
    failed.write_error("FloatingPointError: the loss is NaN")
    interrupted = _run_folder(tmp_path, "d", 0, 4, lora=False, checkpoint=False)
    training = _run_folder(tmp_path, "e", 1, 4, lora=False)
    runs = {r.name: r for r in jobs.list_runs(tmp_path, training=training.path)}
    assert {n: r.state for n, r in runs.items()} == {"a": "finished", "b": "stopped", "c": "failed", "d": "failed",
                                                      "e": "training"}
    assert runs["c"].error == "FloatingPointError: the loss is NaN" and runs["d"].error
    assert runs["a"].exported and not runs["e"].exported and runs["b"].total == 4 and runs["b"].steps == 2
    assert runs["a"].dataset == "data"
    with pytest.raises(ValueError, match="is training"):
        jobs.delete_run(tmp_path, "e", training=training.path)
    with pytest.raises(ValueError, match="no run named"):
        jobs.delete_run(tmp_path, "..")
    jobs.delete_run(tmp_path, "d")
    assert not interrupted.path.exists()


def test_scores_are_kept_per_clip_images_and_steps(tmp_path):
    run = RunDir(tmp_path)
    first = {"cmmd": 1.0, "clip_model": "demo", "n_images": 2, "steps": 2, "seed": 0, "guidance_scale": 5.0}
    assert run.add_score(first) is False
    assert run.add_score({**first, "n_images": 4, "cmmd": 2.0}) is False
    assert run.add_score({**first, "cmmd": 3.0}) is True  # same settings: replaces the first
    assert [(s["n_images"], s["cmmd"]) for s in run.read_scores()] == [(4, 2.0), (2, 3.0)]


def test_samples_are_listed_in_step_order(tmp_path):
    run = RunDir(tmp_path)
    assert run.list_samples() == []
    run.samples_dir.mkdir()
    for name in ("step-000010.png", "step-000000.png", "notes.txt"):
        (run.samples_dir / name).write_bytes(b"")
    assert [p.name for p in run.list_samples()] == ["step-000000.png", "step-000010.png"]


def test_the_presets_offered_are_the_shipped_ones():
    from pipelines import presets

    assert [p.name for p in jobs.list_presets()] == list(presets.names()) and "cpu-quick" in presets.names()


def test_a_failed_start_leaves_no_empty_run_folder_and_a_later_failure_is_recorded(tmp_path):
    def fails_at_start(cfg, **_):
        raise ValueError("could not load an SDXL base model from /no/such/model")

    def fails_later(cfg, **_):
        RunDir(cfg.output_dir).write_config({"method": "m"})
        raise RuntimeError("out of memory")

    worker = jobs.TrainingJobs(tmp_path, train_fn=fails_at_start)
    status = worker.start(TrainConfig())
    assert status.settings["method"] == TrainConfig().method
    status = _wait(worker)
    assert status.state == "failed" and status.error.startswith("could not load an SDXL base model")
    assert "(nothing was saved)" in status.error and not status.run_dir.exists()

    worker = jobs.TrainingJobs(tmp_path, train_fn=fails_later)
    worker.start(TrainConfig())
    status = _wait(worker)
    assert status.error == "RuntimeError: out of memory"
    assert RunDir(status.run_dir).read_error() == status.error


def _wait(worker: jobs.TrainingJobs) -> jobs.JobStatus:
    deadline = time.monotonic() + 10
    while (status := worker.status()).running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return status


def test_usage_notes_name_the_programs_the_scale_and_where_files_go(tmp_path):
    run = RunDir(tmp_path)
    run.write_config({"base": "stabilityai/stable-diffusion-xl-base-1.0", "adapter": {"rank": 8, "alpha": 4.0},
                      "train": {"sample_prompts": ["a cat"]}})
    files = {}
    for kind, programs in (("diffusers", "diffusers: pipe.load_lora_weights(file)"), ("kohya", "ComfyUI, ...")):
        files[kind] = tmp_path / f"run{'' if kind == 'diffusers' else '_kohya'}.safetensors"
        save_file({"x": torch.zeros(1)}, files[kind], {"opdiff_for": programs, "opdiff_exactness": "exact"})
    text = jobs.usage(tmp_path, files)
    assert "LoRA scale (strength) 1.0" in text and "alpha 4 / rank 8" in text
    assert "pipe.load_lora_weights('run.safetensors', adapter_name=\"opdiff\")" in text
    assert "adapter_weights=1.0)" in text and "from_pretrained('stabilityai/stable-diffusion-xl-base-1.0'" in text
    assert "`ComfyUI/models/loras/`" in text and "<lora:run_kohya:1>" in text
    assert "**run_kohya.safetensors**: for ComfyUI, ...; exact." in text
