"""A run is never lost: no overwriting, one process per run folder, honest exit codes, one clear line per failure.

Everything goes through `pipelines.cli.main`, as a user's command would: the exit status, the one line on stderr
(naming the file or folder and what to do) and the files left behind are what is checked. Failures of the file
system are made deterministic by failing the write itself (the tests may run as root, for whom permissions do not
stop a write).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipelines.train
from pipelines.cli import main
from pipelines.rundir import RunDir

pytestmark = pytest.mark.usefixtures("single_thread", "shared_pipeline")

STEPS = 4


@pytest.fixture
def data(demo_subset) -> Path:
    return demo_subset(3)


def _train(data: Path, run: Path, *flags: str) -> int:
    return main(["train", "--data", str(data), "--output-dir", str(run), "--max-steps", str(STEPS), *flags])


def _error(capsys) -> str:
    """The one line a failed command printed on stderr (logged warnings and progress bars aside)."""
    err = capsys.readouterr().err
    lines = re.findall(r"opdiff (?:train|export): .*", err)
    assert len(lines) == 1, err
    return lines[0]


def _no_model_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the refusal")

    monkeypatch.setattr(pipelines.train, "load_pipeline", refuse)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. a run folder is never overwritten ------------------------------------------------------------------------


def test_a_new_run_into_a_finished_run_is_refused_before_loading_and_overwrite_moves_it_aside(
        data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert _train(data, run) == 0
    finished = _snapshot(run)
    assert {"lora.safetensors", "losses.csv", "checkpoint.pt"} <= set(finished)

    with monkeypatch.context() as m:
        _no_model_load(m)
        assert _train(data, run, "--max-steps", "2") == 2
    line = _error(capsys)
    assert f"run folder {run} already holds a run; a new run never overwrites it" in line
    assert f"--resume {run}" in line and "another --output-dir" in line and "--overwrite" in line
    assert _snapshot(run) == finished  # every file as it was

    assert _train(data, run, "--max-steps", "2", "--overwrite") == 0
    (aside,) = tmp_path.glob("run.replaced-*")
    assert _snapshot(aside) == finished  # the earlier run, whole, beside the new one
    assert len(RunDir(run).read_losses()) == 2


def test_a_folder_with_other_files_is_not_taken_over(data, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": 1}')
    (folder / "losses.csv").write_text("my own numbers\n")
    before = _snapshot(folder)
    _no_model_load(monkeypatch)
    assert _train(data, folder) == 2
    line = _error(capsys)
    assert f"run folder {folder} already holds a run" in line and "--overwrite" in line
    assert "--resume" not in line  # it has no checkpoint to continue from
    assert _snapshot(folder) == before


# --- 3. a run that stops early exits non-zero and says partial in its file names ----------------------------------


def _signal_at(monkeypatch, step: int, *signals: int) -> None:
    """Send `signals` to this process at the end of optimizer step `step` (inside the step, as a user would)."""
    real = pipelines.train.Trainer.accumulated_step

    def step_then_signal(self, n, *args, **kwargs):
        result = real(self, n, *args, **kwargs)
        if n == step:
            for s in signals:
                os.kill(os.getpid(), s)
        return result

    monkeypatch.setattr(pipelines.train.Trainer, "accumulated_step", step_then_signal)


def test_sigterm_saves_exports_as_partial_and_exits_143(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at(m, 2, signal.SIGTERM)
        assert _train(data, run) == 128 + signal.SIGTERM
    line = _error(capsys)
    assert line == (f"opdiff train: stopped by SIGTERM at step 2 of {STEPS}; checkpoint saved, the LoRA so far is "
                    f"lora-partial-step2.safetensors. Continue with: opdiff train --resume {run}")
    assert not (run / "lora.safetensors").exists()  # `opdiff train ... && upload lora.safetensors` uploads nothing
    partial = run / "lora-partial-step2.safetensors"
    assert partial.is_file() and (run / "lora-partial-step2_kohya.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(partial), framework="pt") as f:
        assert f.metadata()["opdiff_partial"] == f"stopped after 2 of {STEPS} planned steps"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored

    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "lora.safetensors").is_file() and len(RunDir(run).read_losses()) == STEPS


def test_a_second_signal_stops_at_once_without_traceback_or_temporary_files(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _signal_at(monkeypatch, 3, signal.SIGTERM, signal.SIGTERM)
    try:
        status = _train(data, run, "--checkpoint-every", "1")
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped the command")
    assert status == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"opdiff train: stopped at once by a second SIGTERM: the step in progress was dropped and its last "
            f"checkpoint (step 2) is kept; continue with: opdiff train --resume {run}") in err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not list(run.glob("*.tmp")) and not list(run.glob("lora*"))


def test_a_second_signal_during_a_checkpoint_write_leaves_no_temporary_file(data, tmp_path, capsys, monkeypatch):
    """The second signal lands while checkpoint.pt.tmp is being written (before it is renamed into place)."""
    run = tmp_path / "run"
    real_save, saves = torch.save, []

    def save_then_signal_twice(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        saves.append(path)
        if len(saves) == 2:  # the checkpoint of step 2, written but not yet renamed into place
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr("pipelines.checkpoint.torch.save", save_then_signal_twice)
    try:
        status = _train(data, run, "--checkpoint-every", "1")
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped the command")
    assert status == 128 + signal.SIGINT
    assert "Traceback" not in capsys.readouterr().err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1  # the step-2 write was undone whole
    assert not list(run.glob("*.tmp"))


# --- 4. file-system failures and damaged files: one line naming the file, exit 2, nothing lost ----------------------


def test_a_run_folder_that_turns_read_only_stops_with_the_folder_named(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save

    def read_only_after_the_first(obj, path, *args, **kwargs):
        if (run / "checkpoint.pt").exists():  # as torch reports a folder it cannot write
            raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: "
                               "Permission denied")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("pipelines.checkpoint.torch.save", read_only_after_the_first)
    assert _train(data, run, "--checkpoint-every", "1") == 2
    line = _error(capsys)
    assert f"cannot write the checkpoint of step 2 in {run}" in line and "Permission denied" in line
    assert "its last checkpoint (step 1) is kept" in line and f"opdiff train --resume {run}" in line
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1


def test_an_unwritable_cache_folder_or_a_file_as_run_folder_is_refused_before_loading(
        data, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert _train(data, tmp_path / "run", "--cache-dir", str(a_file / "cache")) == 2
    assert f"cache_dir {a_file / 'cache'} cannot be written" in _error(capsys)
    assert _train(data, a_file) == 2
    assert f"run folder {a_file} is a file, not a folder; choose another --output-dir" in _error(capsys)
    assert a_file.read_text() == "x" and not (tmp_path / "run").exists()


@pytest.fixture
def finished(data, tmp_path) -> Path:
    """A finished run with a checkpoint every step (so older checkpoints are kept)."""
    run = tmp_path / "finished"
    assert _train(data, run, "--checkpoint-every", "1") == 0
    return run


def test_a_damaged_checkpoint_names_itself_and_the_older_one(finished, capsys):
    checkpoint = finished / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    assert main(["train", "--resume", str(finished), "--max-steps", "6"]) == 2
    line = _error(capsys)
    assert f"cannot resume {finished}: {checkpoint} is damaged" in line
    assert f"older checkpoints kept: checkpoint-step{STEPS - 1}.pt; copy one over checkpoint.pt" in line
    assert (finished / "lora.safetensors").is_file()  # nothing else touched


@pytest.mark.parametrize("damage", ["truncated", "bad header"])
def test_a_damaged_training_state_is_named_before_the_base_loads(damage, finished, capsys, monkeypatch):
    state = finished / "adapter_training.safetensors"
    raw = state.read_bytes()
    state.write_bytes(raw[:3000] if damage == "truncated" else (2**62).to_bytes(8, "little") + raw[8:])
    with monkeypatch.context() as m:
        m.setattr("pipelines.export.load_pipeline", lambda *a, **k: pytest.fail("the base model was loaded"))
        assert main(["export", str(finished)]) == 2
    line = _error(capsys)
    assert f"cannot export {finished}: {state} is damaged" in line
    assert f"opdiff train --resume {finished} writes it again from checkpoint.pt" in line

    assert main(["train", "--resume", str(finished)]) == 0  # what the message says to do works
    assert load_file(state).keys() == torch.load(finished / "checkpoint.pt", weights_only=True)["adapter"].keys()


@pytest.mark.parametrize("name", ["config.json", "cmmd.json", "losses.csv"])
def test_damaged_run_files_are_named(name, finished, capsys):
    (finished / name).write_text('{"step": 1' if name.endswith(".json") else "step,loss\n1,x\n")
    assert main(["export", str(finished)]) == 2
    assert f"{finished / name} is damaged" in _error(capsys)


# --- 6. one process per run folder --------------------------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_is_refused(data, tmp_path, capsys):
    """Two runs at once on one folder: the second is refused while the first trains, and the first ends as if alone."""
    run = tmp_path / "run"
    first_is_training, second_tried, errors = threading.Event(), threading.Event(), []

    def first() -> None:
        def wait_for_the_second(event: dict) -> None:
            first_is_training.set()
            second_tried.wait(60)

        try:
            pipelines.train.train(pipelines.train.TrainConfig(data=data, output_dir=run, max_steps=2),
                                  on_event=wait_for_the_second)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert first_is_training.wait(60)
        assert _train(data, run, "--resume", str(run)) == 2
        line = _error(capsys)
        assert _train(data, tmp_path / "run", "--method", "op-lora", "--overwrite") == 2
        overwrite_line = _error(capsys)
    finally:
        second_tried.set()
        thread.join()
    assert not errors
    assert f"run folder {run} is in use by process {os.getpid()}" in line and "wait for it to end" in line
    assert "is in use by" in overwrite_line  # --overwrite does not move a folder in use either
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "lora" and len(RunDir(run).read_losses()) == 2
    assert not (run / RunDir.LOCK).exists() and not list(tmp_path.glob("run.replaced-*"))


def test_a_lock_left_by_a_process_that_ended_is_taken_over(data, tmp_path, caplog):
    holder = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                            check=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / RunDir.LOCK).write_text(f"process {holder.stdout.strip()} on somewhere")  # killed with -9 long ago
    assert _train(data, run) == 0
    assert f"taking over the lock of process {holder.stdout.strip()} on somewhere in {run}" in caplog.text


def test_a_lock_held_by_another_process_is_respected(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'process {os.getpid()} on elsewhere'.encode()); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run / RunDir.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _train(data, run) == 2
        assert f"run folder {run} is in use by process {holder.pid} on elsewhere" in _error(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert _train(data, run) == 0  # its holder gone (killed: the lock file stays), the lock is taken over


# --- 7. settings that cannot train are refused everywhere, with the reason ----------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [("lr", "-1", "lr must be > 0, got -1.0 (0 trains nothing and a negative rate climbs the loss)"),
     ("lr", "0", "lr must be > 0, got 0.0"),
     ("lr", "inf", "lr must be a finite number, got inf"),
     ("lr", "nan", "lr must be a finite number, got nan"),
     ("resolution", "8", "resolution must be >= 32, got 8 (SDXL's VAE divides by 8 and its U-Net halves the latent "
                         "twice more: below 32 px nothing is left to halve)"),
     ("resolution", "16", "resolution must be >= 32, got 16")],
)
def test_values_that_cannot_train_are_refused_by_flag_file_and_code(setting, value, message, data, tmp_path, capsys,
                                                                     monkeypatch):
    _no_model_load(monkeypatch)
    assert _train(data, tmp_path / "run", f"--{setting}", value) == 2
    assert message in capsys.readouterr().err
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({setting: float(value)}))
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    assert message in _error(capsys)
    with pytest.raises(ValueError, match=re.escape(message)):
        pipelines.train.TrainConfig.from_dict({setting: float(value)})
    assert not (tmp_path / "run").exists()


def test_the_smallest_resolution_follows_the_base_models_down_sampling(shared_pipeline):
    from types import SimpleNamespace

    from pipelines.encoding import check_resolution, min_resolution

    assert min_resolution(shared_pipeline) == 32  # the bundled model has SDXL's three resolution levels
    check_resolution(shared_pipeline, 32)
    deeper = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])))
    with pytest.raises(ValueError, match=r"resolution must be >= 64 for this base model, got 32 \(its VAE divides by "
                                         r"8 and its U-Net halves 3 more times\)"):
        check_resolution(deeper, 32)
