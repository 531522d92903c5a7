"""A run folder written by opdiff 0.1 (before the method protocol and the nested config) still resumes and
re-exports: tests/fixtures/README.md says how the fixture was made."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.config import resume_config
from pipelines.export import ExportConfig, export_run
from pipelines.rundir import RunDir
from pipelines.train import train

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "legacy-mpor-run"
UNINTERRUPTED = REPO / "tests" / "fixtures" / "legacy-mpor-run-uninterrupted-lora.safetensors"


pytestmark = pytest.mark.usefixtures("shared_pipeline")


@pytest.fixture
def legacy_run(tmp_path, monkeypatch) -> RunDir:
    """A copy of the fixture, its base found where this checkout keeps the bundled model.

    The run gave its base and data as paths relative to the repository root; config.json also keeps the base's
    absolute path on the machine that trained it, which is this checkout's on that machine.
    """
    run = RunDir(tmp_path / "legacy")
    shutil.copytree(FIXTURE, run.path)
    config = run.read_config()
    config["base"] = str(REPO / "assets" / "tiny-sdxl")
    run.write_config(config)
    monkeypatch.chdir(REPO)
    return run


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_reexport_is_identical(legacy_run, tmp_path, single_thread):
    files = export_run(ExportConfig(legacy_run.path, format="diffusers", out=tmp_path / "again.safetensors"))
    assert _max_difference(load_file(files["diffusers"]), load_file(FIXTURE / RunDir.LORA)) == 0.0


def test_resume_continues_exactly_as_the_old_version_would_have(legacy_run, single_thread):
    assert json.loads((FIXTURE / RunDir.CONFIG).read_text())["train"]["method"] == "lora-over-mpor"
    assert legacy_run.read_events(), "the fixture's selection.json is read as the run's events"
    train(resume_config(legacy_run.path, max_steps=4))
    assert legacy_run.steps_done() == 4
    assert sorted({e["step"] for e in legacy_run.read_events()}) == [1, 2]  # two rounds (split 2), both kept
    assert _max_difference(load_file(legacy_run.lora), load_file(UNINTERRUPTED)) < 1e-6
