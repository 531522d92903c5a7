"""Learning-rate schedules: diffusers' `get_scheduler`, stepped once per optimizer step.

Step s (1-based) trains at lr x lambda(s - 1), lambda being the schedule's factor; the scheduler's state goes into
every checkpoint. Each parameter group keeps its own base rate (e.g. LoRA-Over's cores at `mpo_lr`) and follows
the same factor, also when a method moves parameters between groups while training.
"""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from pipelines.config import TrainConfig

LENGTH_FREE = ("constant", "constant_with_warmup")
"""Schedules whose factor at a step does not depend on the run's length."""


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
                ) -> torch.optim.lr_scheduler.LambdaLR:
    """Return the scheduler of `cfg.lr_scheduler` over `total_steps` optimizer steps (sets the first step's lr)."""
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=total_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


def check_resumed_length(cfg: TrainConfig, saved_total: int | None, total: int) -> None:
    """Raise ValueError when a resumed run changes its length under a schedule that depends on it."""
    if cfg.lr_scheduler not in LENGTH_FREE and saved_total is not None and saved_total != total:
        raise ValueError(f"lr_scheduler {cfg.lr_scheduler} spreads its decay over the run's {saved_total} steps; "
                         f"resuming with {total} would change the rate of every step: keep max_steps and epochs, "
                         "or start a new run")

