"""Several processes, one run: 2 CPU processes (gloo) with batch 1 follow 1 process with batch 2 exactly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.config import TrainConfig
from pipelines.train import train

STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(method: str, data: Path, base: Path, out: Path, batch_size: int) -> dict:
    return {"method": method, "data": str(data), "base": str(base), "output_dir": str(out), "max_steps": STEPS,
            "batch_size": batch_size, "lr": 1e-3, "seed": 0, "device": "cpu", "select_every": 2, "select_top_n": 2,
            "select_split": 2, "sample_prompts": ["a red circle"]}


def launch(n: int, cfg: dict, *extra: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node n -m pipelines.cli train ...`, the same torch.distributed path as accelerate."""
    flags = []
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "pipelines.cli", "train", *flags, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter_training.safetensors")


@pytest.mark.parametrize("method", ["lora", "op-lora", "lora-over-mpor"])
def test_two_processes_match_one_process_with_the_global_batch(method, demo_subset, bundled_model, tmp_path,
                                                               single_thread):
    data = demo_subset(4)
    two = tmp_path / "two"
    result = launch(2, settings(method, data, bundled_model, two, batch_size=1))
    assert result.returncode == 0, result.stderr[-3000:]
    one = train(TrainConfig.from_dict(settings(method, data, bundled_model, tmp_path / "one", batch_size=2)))
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    if method == "lora-over-mpor":
        assert any("cores" in k for k in a), "no selection happened within the run"
    # The whole adapter as one vector: float32 sums in another order move single near-zero entries of B (where
    # AdamW divides a tiny gradient by a tiny second moment) by ~1e-6 absolute, never the adapter as a whole.
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    whole = torch.cat([a[k].flatten() for k in a])
    assert float(diff.norm() / whole.norm()) < 1e-5
    assert float(diff.abs().max()) < 1e-5
    def losses(run: Path) -> list[float]:
        return [float(line.split(",")[1]) for line in (run / "losses.csv").read_text().splitlines()[1:]]

    assert len(losses(one)) == STEPS and losses(two) == pytest.approx(losses(one), abs=1e-6)
    # One writer: exactly one checkpoint and one export set, no per-process copies.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(list(two.glob("checkpoint*"))) == 1 and len(list(two.glob("lora*.safetensors"))) == 2  # diffusers+kohya
    assert result.stdout.count("run folder:") == 1


def test_a_two_process_run_resumes_in_one_process(demo_subset, bundled_model, tmp_path, single_thread):
    data = demo_subset(4)
    run = tmp_path / "run"
    cfg = settings("op-lora", data, bundled_model, run, batch_size=1)
    result = launch(2, {**cfg, "max_steps": 2})
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = train(replace(TrainConfig.from_dict(cfg), resume=run))
    assert len((resumed / "losses.csv").read_text().splitlines()) == 1 + STEPS


def test_accumulation_over_two_processes_matches_one_process_with_the_whole_batch(demo_subset, bundled_model,
                                                                                 tmp_path, single_thread):
    """2 processes x batch 1 x 2 accumulation steps = 1 process with batch 4."""
    data = demo_subset(4)
    two = tmp_path / "two"
    result = launch(2, {**settings("op-lora", data, bundled_model, two, batch_size=1),
                        "gradient_accumulation_steps": 2})
    assert result.returncode == 0, result.stderr[-3000:]
    one = train(TrainConfig.from_dict(settings("op-lora", data, bundled_model, tmp_path / "one", batch_size=4)))
    a, b = adapter(one), adapter(two)
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    assert float(diff.norm() / torch.cat([a[k].flatten() for k in a]).norm()) < 1e-5
    rows = [(run / "losses.csv").read_text().splitlines()[1:] for run in (one, two)]
    assert [float(r.split(",")[1]) for r in rows[1]] == pytest.approx([float(r.split(",")[1]) for r in rows[0]],
                                                                      abs=1e-6)
