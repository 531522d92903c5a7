"""Checkpoints: what `--resume` needs to continue a run with the loss curve an uninterrupted run would have had.

`checkpoint.pt` holds the adapter's uncollapsed state (MLPs, cores, the method's buffers), the optimizer, the
learning-rate scheduler, the loss scaler, the random generators, the loss history, the method's events and the
run's config. It alone is what `resume` reads; the files derived from it (losses.csv,
adapter_training.safetensors, events.json) are rewritten with it, so they never disagree about the step a run
continues from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import opdiff
from pipelines.config import RESUME_MAY_CHANGE, TrainConfig, saved_settings
from pipelines.data import Dataset
from pipelines.rundir import RunDir

FORMAT = 1


def run_config(cfg: TrainConfig, dataset: Dataset) -> dict:
    """The run's config.json: resolved settings, the adapter, where the base and data came from."""
    base = Path(cfg.base).expanduser()
    return {
        "train": cfg.to_dict(),
        "adapter": cfg.adapter.to_dict(),
        "method": cfg.adapter.method,
        "base": str(base.resolve()) if base.exists() else cfg.base,
        "dataset": {
            "path": str(Path(cfg.data).resolve()),
            "root": str(dataset.root.resolve()),
            "hash": dataset.hash,
            "images": len(dataset),
            "skipped": [{"file": n, "reason": r} for n, r in dataset.skipped],
            "converted": [{"file": n, "note": r} for n, r in dataset.converted],
        },
        "opdiff_version": opdiff.__version__,
    }


def check_resumable(saved: dict, now: dict, run: RunDir) -> None:
    """Raise ValueError naming every setting that differs from the checkpoint's in a way resuming cannot honour."""
    before = {**TrainConfig().to_dict(), **saved_settings(saved["train"])}  # settings newer than the run
    after = now["train"]
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in after.items()
               if k not in RESUME_MAY_CHANGE and before.get(k) != v]
    if saved["dataset"]["hash"] != now["dataset"]["hash"]:
        changed.append(f"dataset content: hash {saved['dataset']['hash'][:12]} -> {now['dataset']['hash'][:12]}")
    if changed:
        raise ValueError(f"cannot resume {run.path} with other settings ({'; '.join(changed)}); only "
                         f"{', '.join(sorted(RESUME_MAY_CHANGE - {'resume', 'output_dir'}))} may change. "
                         "Start a new run instead")


@dataclass
class Checkpoint:
    """A loaded checkpoint.pt."""

    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict
    rng: dict
    losses: list[float]
    events: list[dict]
    config: dict
    scheduler: dict | None = None
    """The learning-rate scheduler's state (None in checkpoints of runs before schedules: constant)."""

    @classmethod
    def load(cls, run: RunDir) -> Checkpoint:
        """Read the run's checkpoint; ValueError naming the file when there is none or it cannot be read."""
        if not run.checkpoint.is_file():
            raise ValueError(f"cannot resume {run.path}: no {RunDir.CHECKPOINT} (the run saved no checkpoint)")
        raw = torch.load(run.checkpoint, map_location="cpu", weights_only=True)  # tensors and plain data only
        if raw.get("format") != FORMAT:
            raise ValueError(f"cannot resume {run.path}: {RunDir.CHECKPOINT} has format {raw.get('format')!r}, "
                             f"this version reads {FORMAT}")
        events = raw.get("events", raw.get("selections", []))  # opdiff 0.1 called the method's events selections
        return cls(raw["step"], raw["adapter"], raw["optimizer"], raw["scaler"], raw["rng"], list(raw["losses"]),
                   list(events), raw["config"], raw.get("scheduler"))


def save_checkpoint(run: RunDir, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, rng: torch.Generator, losses: list[float], events: list[dict],
                    config: dict, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """Write checkpoint.pt and the files derived from it (adapter state, loss curve, events), each atomically."""
    adapter = {k: v.detach().to("cpu").contiguous() for k, v in opdiff.training_state_dict(unet).items()}
    checkpoint = {
        "format": FORMAT,
        "step": step,
        "adapter": adapter,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"train": rng.get_state(), "torch": torch.get_rng_state()},
        "losses": list(losses),
        "events": list(events),
        "config": config,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    tmp = run.path / (RunDir.CHECKPOINT + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(run.checkpoint)
    save_training_state(adapter, run.training_state, config)
    run.write_losses(losses)
    run.write_events(events)


def save_training_state(adapter: dict[str, torch.Tensor], path: Path, config: dict) -> None:
    """Write the uncollapsed adapter state (what `opdiff export` rebuilds the adapter from) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(adapter, tmp, metadata={"opdiff_config": json.dumps(config, sort_keys=True)})
    tmp.replace(path)
