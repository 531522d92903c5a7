"""Checkpoints: what `--resume` needs to continue a run with the loss curve an uninterrupted run would have had.

`checkpoint.pt` holds the adapter's uncollapsed state (MLPs, cores, the method's buffers), the optimizer, the
learning-rate scheduler, the loss scaler, the random generators, the loss history, the method's events and the run's config. It alone is what
`resume` reads; the files derived from it (losses.csv, adapter_training.safetensors, events.json) are rewritten
with it, so they never disagree about the step a run continues from.

A checkpoint is written only for a state that is finite throughout (a diverged update never replaces a good
checkpoint), and the checkpoints before the newest are kept as `checkpoint-step<N>.pt` (`keep_checkpoints`), for a
run that went wrong while its numbers stayed finite.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import opdiff
from pipelines.config import OPTIMIZATION_SETTINGS, RESUME_MAY_CHANGE, TrainConfig, saved_settings
from pipelines.data import Dataset
from pipelines.rundir import RunDir

log = logging.getLogger(__name__)

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


def check_resumable(saved: dict, now: dict, run: RunDir) -> dict[str, list]:
    """Return the optimization settings that differ from the checkpoint's, as {name: [before, now]}.

    Raises ValueError naming every changed setting outside RESUME_MAY_CHANGE: those change the model or what it
    learns from, so the result would be neither the run that was started nor a new one.
    """
    before = {**TrainConfig().to_dict(), **saved_settings(saved["train"])}  # settings newer than the run
    after = now["train"]
    refused = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in after.items()
               if k not in RESUME_MAY_CHANGE and before.get(k) != v]
    if saved["dataset"]["hash"] != now["dataset"]["hash"]:
        refused.append(f"dataset content: hash {saved['dataset']['hash'][:12]} -> {now['dataset']['hash'][:12]}")
    if refused:
        allowed = ", ".join(sorted(RESUME_MAY_CHANGE - {"resume", "output_dir"}))
        raise ValueError(f"cannot resume {run.path} with other settings ({'; '.join(refused)}): they change the model "
                         f"or the data it learns from. Only {allowed} may change. Start a new run instead")
    return {k: [before.get(k), v] for k, v in after.items() if k in OPTIMIZATION_SETTINGS and before.get(k) != v}


def resume_history(saved: dict, step: int, changed: dict[str, list]) -> list[dict]:
    """Return config.json's `resumed` list: the checkpoint's, plus this resume (its step and changed settings).

    The changes are logged too, so a run's optimization path can be read from its folder.
    """
    if changed:
        log.warning("resuming at step %d with changed settings: %s", step,
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return [*saved.get("resumed", []), {"step": step, "changed": changed}]


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state (moments, step counts), keeping every group's hyperparameters as the
    settings now give them: a resumed run may change its learning rate, and the saved groups hold the old one."""
    current = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, hyper in zip(optimizer.param_groups, current, strict=True):
        group.update(hyper)


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
        try:
            raw = torch.load(run.checkpoint, map_location="cpu", weights_only=True)  # tensors and plain data only
            if not isinstance(raw, dict):
                raise ValueError(f"it holds a {type(raw).__name__}, not a checkpoint")
        except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            older = run.older_checkpoints()
            fix = (f"older checkpoints kept: {', '.join(p.name for _, p in older)}; copy one over {RunDir.CHECKPOINT} "
                   "and resume again, or start a new run" if older else "start a new run (no older checkpoint is kept)")
            raise ValueError(f"cannot resume {run.path}: {run.checkpoint} is damaged ({str(e).splitlines()[0]}); "
                             f"{fix}") from None
        if raw.get("format") != FORMAT:
            raise ValueError(f"cannot resume {run.path}: {RunDir.CHECKPOINT} has format {raw.get('format')!r}, "
                             f"this version reads {FORMAT}")
        events = raw.get("events", raw.get("selections", []))  # opdiff 0.1 called the method's events selections
        return cls(raw["step"], raw["adapter"], raw["optimizer"], raw["scaler"], raw["rng"], list(raw["losses"]),
                   list(events), raw["config"], raw.get("scheduler"))


class Checkpoints:
    """A run's checkpoints: `save` writes checkpoint.pt and keeps the `keep - 1` before it as checkpoint-step<N>.pt.

    `step` is the step the newest checkpoint holds (0: none yet); `lr` the run's learning rate, for the advice a
    diverged run ends with.
    """

    def __init__(self, run: RunDir, keep: int, step: int, lr: float) -> None:
        self.run, self.keep, self.step, self.lr = run, keep, step, lr

    def save(self, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             rng: torch.Generator, losses: list[float], events: list[dict], config: dict,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, write: bool = True) -> None:
        """Check the state after `step` and write it (with `write`: one process writes, every process checks).

        Raises `diverged` (nothing written) when the adapter or the optimizer holds NaN or inf, and ValueError naming
        the file when the run folder cannot be written (the previous checkpoint is then kept).
        """
        problem = non_finite(opdiff.training_state_dict(unet), optimizer.state_dict())
        if problem:
            raise self.diverged(f"{problem} after step {step}")
        if not write:
            return
        previous = self.run.checkpoint if self.run.checkpoint.is_file() and 0 < self.step < step else None
        try:
            save_checkpoint(self.run, step, unet, optimizer, scaler, rng, losses, events, config, scheduler,
                            keep_previous=self.run.older_checkpoint(self.step) if previous and self.keep > 1 else None)
        except (OSError, RuntimeError) as e:  # torch.save reports a folder it cannot write as a RuntimeError
            kept = f"its last checkpoint (step {self.step}) is kept" if self.step else "no checkpoint was written"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).rsplit("strerror: ", 1)[-1]
            raise ValueError(f"cannot write the checkpoint of step {step} in {self.run.path} ({reason}); the run "
                             f"stopped and {kept}. Make the folder writable or free disk space, then continue with: "
                             f"opdiff train --resume {self.run.path}") from None
        self.step = step
        for _, path in [(s, p) for s, p in self.run.older_checkpoints() if s < step][self.keep - 1:]:
            path.unlink(missing_ok=True)

    def diverged(self, reason: str) -> FloatingPointError:
        """The error a diverged run ends with: what went wrong, which checkpoint is good, and how to go on."""
        if not self.step:
            return FloatingPointError(f"{reason}: the run stopped and no checkpoint was saved; start again with a "
                                      f"lower learning rate (e.g. --lr {self.lr / 10:g}) and --overwrite, or in "
                                      "another folder")
        message = (f"{reason}: the run stopped and its last good checkpoint, {self.run.checkpoint} (step {self.step}), "
                   f"is kept; continue from it with a lower learning rate: opdiff train --resume {self.run.path} "
                   f"--lr {self.lr / 10:g}")
        # Finite is not always trainable: the state just before a blow-up may have no finite gradient left.
        older = [path for step, path in self.run.older_checkpoints() if step < self.step]
        if older:
            message += f". Should that diverge again, copy the older {older[0]} over {RunDir.CHECKPOINT} first"
        else:
            message += ". Should that diverge again, start anew with a lower --lr and --overwrite"
        return FloatingPointError(message)


def non_finite(adapter: dict[str, torch.Tensor], optimizer_state: dict) -> str:
    """Return "" when every adapter tensor and optimizer state tensor is finite, else a phrase counting the NaN/inf
    values and naming the first tensor that holds one."""
    tensors = [(f"adapter {k}", v) for k, v in adapter.items()]
    tensors += [(f"optimizer {name} of parameter {i}", v) for i, state in optimizer_state["state"].items()
                for name, v in state.items() if isinstance(v, torch.Tensor)]
    bad = [(name, int((~torch.isfinite(v)).sum())) for name, v in tensors if v.is_floating_point()]
    bad = [(name, n) for name, n in bad if n]
    if not bad:
        return ""
    return f"{sum(n for _, n in bad):,} NaN/inf values in {len(bad)} tensor(s) (first: {bad[0][0]})"


def save_checkpoint(run: RunDir, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, rng: torch.Generator, losses: list[float], events: list[dict],
                    config: dict, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    keep_previous: Path | None = None) -> None:
    """Write checkpoint.pt and the files derived from it (adapter state, loss curve, events), each atomically.

    With `keep_previous`, the checkpoint.pt being replaced stays under that name (a hard link: no copy where the
    file system has them). checkpoint.pt itself is replaced in one rename, so it always holds a whole checkpoint.
    """
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
    try:
        torch.save(checkpoint, tmp)
        if keep_previous is not None:
            _keep(run.checkpoint, keep_previous)
        tmp.replace(run.checkpoint)
    finally:  # also when interrupted: no temporary file is left behind
        tmp.unlink(missing_ok=True)
    save_training_state(adapter, run.training_state, config)
    run.write_losses(losses)
    run.write_events(events)


def _keep(path: Path, as_path: Path) -> None:
    """Make `as_path` a second name of the file at `path` (a copy where hard links are not possible)."""
    tmp = as_path.with_name(as_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        tmp.replace(as_path)
    finally:
        tmp.unlink(missing_ok=True)


def save_training_state(adapter: dict[str, torch.Tensor], path: Path, config: dict) -> None:
    """Write the uncollapsed adapter state (what `opdiff export` rebuilds the adapter from) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(adapter, tmp, metadata={"opdiff_config": json.dumps(config, sort_keys=True)})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
