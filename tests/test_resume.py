"""Checkpoints and resuming: an interrupted run, resumed, is the uninterrupted run, step for step and bit for bit.

Interruptions: a shorter `max_steps`, `should_stop` from a background thread (as the GUI stops), Ctrl-C. The runs
use random crops and flips, so the restored generator state is exercised, and cross an epoch boundary after the
interruption. lora-over-mpor is interrupted between two of its selection rounds. A diverging run keeps its good
checkpoints, and resuming may change how the rest is optimized (the learning rate) but not the model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipelines.step
from pipelines.cli import build_parser
from pipelines.config import TrainConfig, config_from_args, resume_config
from pipelines.interrupt import TrainingInterrupted
from pipelines.rundir import RunDir
from pipelines.train import train

RESUME_METHODS = ["lora", "op-lora", "lora-over-mpor"]
STEPS, HALF = 4, 2  # 3 images, batch 1: the second half starts mid-epoch and crosses into the next epoch
# MPOR: one matrix per group at steps 1, 2 and 3, so the interruption at step 2 falls between selection rounds.
SETTINGS = {"max_steps": STEPS, "lr": 1e-3, "random_crop": True, "flip": True, "select_every": 1,
            "select_top_n": 3, "select_split": 3}


pytestmark = pytest.mark.usefixtures("shared_pipeline")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, bundled_data) -> Path:
    """A module-wide folder with 3 demo images (`data/`) and a latent cache shared by every run here."""
    root = tmp_path_factory.mktemp("resume")
    (root / "data").mkdir()
    for image in sorted(bundled_data.glob("*.png"))[:3]:
        shutil.copy(image, root / "data" / image.name)
        shutil.copy(image.with_suffix(".txt"), root / "data" / image.with_suffix(".txt").name)
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.single_thread; module-scoped here because the runs are
    yield
    torch.set_num_threads(threads)


def _run(workdir: Path, name: str, method: str, **changes) -> TrainConfig:
    return TrainConfig(data=workdir / "data", output_dir=workdir / name, method=method, cache_dir=workdir / "cache",
                       **{**SETTINGS, **changes})


def _train(cfg: TrainConfig, **kwargs) -> list[dict]:
    events = []
    train(cfg, on_event=events.append, **kwargs)
    return events


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> dict[str, tuple[Path, list[dict]]]:
    """Per method: the run folder and events of STEPS steps in one go."""
    return {m: (workdir / f"full-{m}", _train(_run(workdir, f"full-{m}", m))) for m in RESUME_METHODS}


def _assert_same_run(run_dir: Path, events: list[dict], reference: tuple[Path, list[dict]]) -> None:
    ref_dir, ref_events = reference
    assert [e["step"] for e in events] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in events] == [e["loss"] for e in ref_events]  # exact: same floats
    for name in ("losses.csv", "events.json"):
        assert (run_dir / name).exists() == (ref_dir / name).exists()
        if (ref_dir / name).exists():
            assert (run_dir / name).read_text() == (ref_dir / name).read_text(), name
    for name in ("adapter_training.safetensors", "lora.safetensors"):
        mine, theirs = load_file(run_dir / name), load_file(ref_dir / name)
        assert mine.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), (name, key)
    assert not list(run_dir.glob("*.tmp"))


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / RunDir.CHECKPOINT, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", RESUME_METHODS)
def test_resume_after_max_steps_continues_the_same_run(method, workdir, uninterrupted):
    first = _train(_run(workdir, f"steps-{method}", method, max_steps=HALF))
    checkpoint = _checkpoint(workdir / f"steps-{method}")
    assert checkpoint["step"] == HALF and len(checkpoint["losses"]) == HALF
    if method == "lora-over-mpor":
        chosen = json.loads((workdir / f"steps-{method}" / "events.json").read_text())
        assert {row["step"] for row in chosen} == {1, 2}  # selection happened before the interruption ...
    second = _train(resume_config(workdir / f"steps-{method}", max_steps=STEPS))
    _assert_same_run(workdir / f"steps-{method}", first + second, uninterrupted[method])
    if method == "lora-over-mpor":
        chosen = json.loads((workdir / f"steps-{method}" / "events.json").read_text())
        assert {row["step"] for row in chosen} == {1, 2, 3}  # ... and went on after it


@pytest.mark.parametrize("method", RESUME_METHODS)
def test_resume_after_should_stop_from_a_background_thread(method, workdir, uninterrupted):
    events, errors = [], []
    cfg = _run(workdir, f"stop-{method}", method)

    def worker() -> None:  # as the GUI runs it: signal handlers cannot be installed here, should_stop is the way
        try:
            train(cfg, on_event=events.append, should_stop=lambda: len(events) >= HALF)
        except Exception as e:  # noqa: BLE001 - reported to the test below
            errors.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert not errors and [e["step"] for e in events] == [1, 2]
    assert _checkpoint(workdir / f"stop-{method}")["step"] == HALF
    # A stopped run still leaves its LoRA, named for what it is: never the finished run's file name.
    assert (workdir / f"stop-{method}" / "lora-partial-step2.safetensors").is_file()
    assert not (workdir / f"stop-{method}" / "lora.safetensors").exists()
    events += _train(resume_config(workdir / f"stop-{method}"))
    _assert_same_run(workdir / f"stop-{method}", events, uninterrupted[method])


def test_ctrl_c_saves_a_checkpoint_and_resumes(workdir, uninterrupted, caplog):
    events = []

    def press_ctrl_c(event: dict) -> None:
        events.append(event)
        if event["step"] == HALF:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as stopped:  # saved, exported, and still not mistaken for a finished run
        train(_run(workdir, "ctrl-c", "lora"), on_event=press_ctrl_c)
    assert [e["step"] for e in events] == [1, 2]
    assert (stopped.value.saved, stopped.value.exit_status) == (True, 130)
    assert "SIGINT: stopping after this step" in caplog.text
    assert (f"stopped by SIGINT at step 2 of 4; checkpoint saved, the LoRA so far is lora-partial-step2.safetensors. "
            f"Continue with: opdiff train --resume {workdir / 'ctrl-c'}") == str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    events += _train(resume_config(workdir / "ctrl-c"))
    _assert_same_run(workdir / "ctrl-c", events, uninterrupted["lora"])


def test_second_ctrl_c_aborts_without_a_checkpoint(workdir):
    def press_twice(event: dict) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="stopped at once by a second SIGINT: the step in progress was "
                       "dropped and no checkpoint was saved") as stopped:
        train(_run(workdir, "abort", "lora"), on_event=press_twice)
    assert (stopped.value.saved, stopped.value.exit_status) == (False, 130)
    assert not (workdir / "abort" / RunDir.CHECKPOINT).exists() and not list((workdir / "abort").glob("*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(workdir, monkeypatch):
    real_loss, calls = pipelines.step.diffusion_loss, []

    def loss_that_diverges(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr("pipelines.step.diffusion_loss", loss_that_diverges)
    run_dir = workdir / "nan"
    with pytest.raises(FloatingPointError, match=f"loss is nan at step 3: the run stopped and its last good checkpoint, "
                                                 f"{run_dir}/checkpoint.pt \\(step 2\\), is kept; continue from it "
                                                 f"with a lower learning rate: opdiff train --resume {run_dir} --lr "
                                                 "0.0001"):
        train(_run(workdir, "nan", "op-lora", checkpoint_every=2))
    checkpoint = _checkpoint(run_dir)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["adapter"].values())
    assert not (run_dir / "lora.safetensors").exists() and not list(run_dir.glob("*.tmp"))


def test_checkpoint_holds_everything_to_resume(workdir, uninterrupted):
    checkpoint = _checkpoint(uninterrupted["lora-over-mpor"][0])
    assert set(checkpoint) == {"format", "step", "adapter", "optimizer", "scaler", "rng", "losses", "events",
                               "config", "scheduler"}
    assert checkpoint["scheduler"]["last_epoch"] == STEPS  # stepped once per optimizer step
    assert checkpoint["step"] == STEPS
    assert any(k.startswith("opdiff.select.") for k in checkpoint["adapter"])  # MPOR's scores and choices
    assert {g["name"] for g in checkpoint["optimizer"]["param_groups"]} == {"adapter", "mpo"}
    assert set(checkpoint["rng"]) == {"train", "torch"}


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"rank": 8}, r"rank: 4 -> 8"), ({"method": "dora"}, "method: 'lora' -> 'dora'"),
     ({"flip": False}, "flip: True -> False")],
)
def test_resume_refuses_settings_that_change_the_model_or_its_data(changes, match, workdir, uninterrupted):
    with pytest.raises(ValueError, match=f"cannot resume .* with other settings \\({match}\\): they change the model"):
        train(resume_config(uninterrupted["lora"][0], **changes))


def test_resume_refuses_changed_data_and_foreign_folders(workdir, uninterrupted, tmp_path):
    shutil.copytree(workdir / "data", tmp_path / "data")
    (tmp_path / "data" / "demo_00.txt").write_text("another caption")
    with pytest.raises(ValueError, match="dataset content: hash"):
        train(resume_config(uninterrupted["lora"][0], data=tmp_path / "data"))
    with pytest.raises(ValueError, match="writes into its own folder"):
        train(resume_config(uninterrupted["lora"][0], output_dir=tmp_path / "elsewhere"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": {}, "opdiff_version": "0"}))
    with pytest.raises(ValueError, match="no checkpoint.pt"):
        train(resume_config(tmp_path / "run"))
    with pytest.raises(ValueError, match="has no config.json"):
        resume_config(tmp_path)


def test_cli_resume_takes_the_run_settings_under_the_flags(uninterrupted):
    run_dir = uninterrupted["op-lora"][0]
    args = build_parser().parse_args(["train", "--resume", str(run_dir), "--max-steps", "8"])
    cfg = config_from_args(args)
    assert (cfg.resume, cfg.output_dir, cfg.method, cfg.max_steps) == (run_dir, run_dir, "op-lora", 8)
    assert (cfg.random_crop, cfg.flip, cfg.lr) == (True, True, 1e-3)


def test_a_diverging_run_writes_no_poisoned_checkpoint_and_resumes_with_a_lower_lr(workdir, caplog):
    """lr 1e3 and a checkpoint every step: an update turns the adapter to NaN while the loss it started from was still
    finite. That state is never written: the message names the checkpoint that is good, which holds only finite
    numbers (optimizer included), and the one before it, kept too, from which a lower learning rate trains on."""
    run_dir = workdir / "diverge"
    with pytest.raises(FloatingPointError) as diverged:
        train(_run(workdir, "diverge", "lora", lr=1e3, checkpoint_every=1, max_steps=8))
    good = _checkpoint(run_dir)
    older = run_dir / f"checkpoint-step{good['step'] - 1}.pt"
    assert f"after step {good['step'] + 1}: the run stopped and its last good checkpoint, {run_dir / 'checkpoint.pt'} " \
           f"(step {good['step']}), is kept; continue from it with a lower learning rate: opdiff train --resume " \
           f"{run_dir} --lr 100. Should that diverge again, copy the older {older} over checkpoint.pt first" \
           in str(diverged.value)
    assert "NaN/inf values" in str(diverged.value)
    for checkpoint in (good, torch.load(older, map_location="cpu", weights_only=True)):
        assert all(torch.isfinite(t).all() for t in checkpoint["adapter"].values())
        assert all(torch.isfinite(v).all() for state in checkpoint["optimizer"]["state"].values()
                   for v in state.values())
    assert [step for step, _ in RunDir(run_dir).older_checkpoints()] == [good["step"] - 1]

    shutil.copy(older, run_dir / "checkpoint.pt")  # as the message says
    events = _train(resume_config(run_dir, lr=1e-5, max_steps=good["step"] + 1))
    assert [e["step"] for e in events] == [good["step"], good["step"] + 1]
    assert all(torch.isfinite(t).all() for t in _checkpoint(run_dir)["adapter"].values())
    assert f"resuming at step {good['step'] - 1} with changed settings: lr 1000.0 -> 1e-05" in caplog.text


def test_resume_may_change_the_learning_rate_and_records_it(workdir, uninterrupted):
    run_dir = workdir / "new-lr"
    first = _train(_run(workdir, "new-lr", "lora", max_steps=HALF))
    second = _train(resume_config(run_dir, max_steps=STEPS, lr=1e-4))
    reference = [e["loss"] for e in uninterrupted["lora"][1]]
    losses = [e["loss"] for e in first + second]
    assert losses[:HALF + 1] == reference[:HALF + 1]  # step 3's loss is computed before its update
    assert losses[HALF + 1:] != reference[HALF + 1:]  # ... which used the new rate
    assert {g["lr"] for g in _checkpoint(run_dir)["optimizer"]["param_groups"]} == {1e-4}
    resumed = json.loads((run_dir / "config.json").read_text())["resumed"]
    assert resumed == [{"step": HALF, "changed": {"lr": [1e-3, 1e-4], "max_steps": [HALF, STEPS]}}]


@pytest.mark.parametrize("keep", [1, 3])
def test_the_newest_checkpoints_are_kept(keep, workdir):
    run_dir = train(_run(workdir, f"keep-{keep}", "lora", checkpoint_every=1, keep_checkpoints=keep))
    assert _checkpoint(run_dir)["step"] == STEPS
    older = RunDir(run_dir).older_checkpoints()
    assert [step for step, _ in older] == list(range(STEPS - 1, STEPS - keep, -1))
    for step, path in older:
        assert torch.load(path, map_location="cpu", weights_only=True)["step"] == step
