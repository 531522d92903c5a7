"""Train an opdiff adapter on an SDXL U-Net: encode images and captions once, then a plain DDPM loop.

The parts live beside this file: `encoding` (VAE and text encoders, disk cache), `training_data` (buckets, views,
batches), `step` (loss, backward, the method's hooks, optimizer), `checkpoint` (save and resume), `rundir` (the
files of a run folder). This file is the loop that ties them together.

A run is resumable: batches are a function of (seed, epoch) alone and every checkpoint holds the random
generators, so `--resume` replays exactly the steps an uninterrupted run would take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from tqdm.auto import tqdm

import opdiff
from pipelines.captions import CaptionRules
from pipelines.checkpoint import (
    Checkpoint,
    Checkpoints,
    check_resumable,
    restore_optimizer,
    resume_history,
    run_config,
)
from pipelines.config import TrainConfig
from pipelines.data import Dataset, scan_dataset
from pipelines.distributed import Ranks
from pipelines.encoding import check_resolution, native_resolution
from pipelines.export import export
from pipelines.interrupt import StopRequests, TrainingInterrupted, stop_requests
from pipelines.logging_tb import TrainLog, check_logging
from pipelines.memory import estimate_memory
from pipelines.model import default_device, load_pipeline
from pipelines.optimizers import RELATIVE_LR, build_optimizer, check_optimizer
from pipelines.previews import Previews
from pipelines.rundir import RunDir, check_writable
from pipelines.schedule import check_resumed_length, lr_schedule
from pipelines.step import Part, Trainer, diffusion_loss
from pipelines.training_data import TrainingData, epoch_batches, probe_batches, steps_per_epoch

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train(
    cfg: TrainConfig,
    on_event: Callable[[dict], None] | None = None,
    pipe: StableDiffusionXLPipeline | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Train the adapter `cfg` describes; return the run folder (see `pipelines.rundir` for its files).

    `on_event` receives {step, total, loss, it_s, eta_s, lr, smoothed_loss, events} after each step (and grad_norm
    with clipping), and {step, total, samples} for each grid of samples while training. A given `pipe` is trained in
    place (its U-Net ends up carrying the collapsed adapter). A new run needs an empty (or missing) folder, or
    `cfg.overwrite`, which moves what is there aside; the folder is locked against a second process while it trains.
    `cfg.resume` (see `pipelines.config.resume_config`) continues a run from its checkpoint.

    Stopping early: `should_stop` is polled before every step; in the main thread SIGINT or SIGTERM does the same.
    Either way the run saves a checkpoint and exports the LoRA so far as `lora-partial-step<N>*.safetensors`;
    `should_stop` then returns, a signal raises `pipelines.interrupt.TrainingInterrupted` (a second signal stops at
    once, without a checkpoint for the step in progress). A non-finite loss or state raises FloatingPointError
    naming the last good checkpoint; a run folder that cannot be written raises ValueError naming it.
    """
    run = RunDir(_run_dir(cfg))
    device = cfg.device or default_device()
    check_optimizer(cfg.optimizer, device)  # a missing package or an unsupported device: before any work
    check_logging(cfg.log_with)
    check_writable(cfg.cache_dir, "cache_dir")
    if not Ranks.current(device).main:  # one process owns the folder
        return _train(cfg, run, on_event, pipe, should_stop)
    with run.claim(new_run=cfg.resume is None, overwrite=cfg.overwrite):
        try:
            return _train(cfg, run, on_event, pipe, should_stop)
        except TrainingInterrupted as e:
            if e.saved:
                raise
            kept = (f"its last checkpoint (step {run.steps_done()}) is kept; continue with: opdiff train --resume "
                    f"{run.path}" if run.checkpoint.is_file() else "no checkpoint was saved")
            raise TrainingInterrupted(e.signum, f"{e}: the step in progress was dropped and {kept}", saved=False
                                      ) from None


def _train(cfg: TrainConfig, run: RunDir, on_event: Callable[[dict], None] | None,
           pipe: StableDiffusionXLPipeline | None, should_stop: Callable[[], bool] | None) -> Path:
    """`train` in a folder it may use."""
    checkpoint = Checkpoint.load(run) if cfg.resume is not None else None
    device = cfg.device or default_device()
    ranks = Ranks.current(device)  # several processes: see pipelines.distributed
    with ranks.main_first():  # a zip is extracted once
        dataset = _scan(cfg, run)  # a bad dataset fails here, before any model loads
    log.info("dataset %s: %d images, %d skipped", cfg.data, len(dataset), len(dataset.skipped))
    autocast_dtype = AUTOCAST_DTYPES.get(cfg.mixed_precision)
    if pipe is None:  # on the CPU: only what is needed goes to the device, and only while needed
        pipe = load_pipeline(cfg.base, autocast_dtype or torch.float32, device="cpu", vae=cfg.vae)
    prompts = cfg.sample_prompts or tuple(CaptionRules.of(cfg).fixed(ex.caption) for ex in dataset.examples[:2])
    cfg = replace(cfg, output_dir=run.path, resume=None, resolution=cfg.resolution or native_resolution(pipe),
                  device=device, sample_prompts=prompts)
    check_resolution(pipe, cfg.resolution)
    config = run_config(cfg, dataset)
    if checkpoint is not None:
        config["resumed"] = resume_history(checkpoint.config, checkpoint.step,
                                           check_resumable(checkpoint.config, config, run))
    run.path.mkdir(parents=True, exist_ok=True)
    with ranks.main_first():  # a disk cache is filled once, then read by the other processes
        data = TrainingData(pipe, dataset, cfg, device)
    global_batch = cfg.batch_size * ranks.world * cfg.gradient_accumulation_steps  # batch_size: per process and part
    per_epoch = steps_per_epoch(data.buckets, global_batch)
    total = cfg.max_steps or cfg.epochs * per_epoch
    if checkpoint is not None:
        check_resumed_length(cfg, checkpoint.config.get("schedule", {}).get("total_steps"), total)
    trainer = _trainer(pipe, cfg, data, device, autocast_dtype, ranks, checkpoint, total)
    rng = torch.Generator().manual_seed(cfg.seed)  # views, noise and timesteps; CPU so runs match anywhere
    losses, events, done = [], [], 0
    if checkpoint is not None:
        rng.set_state(checkpoint.rng["train"])
        torch.set_rng_state(checkpoint.rng["torch"])
        losses, events, done = checkpoint.losses, checkpoint.events, checkpoint.step
        log.info("resuming %s at step %d", run.path, done)
    method = opdiff.method_of(trainer.unet)
    if (warning := method.schedule_warning(cfg.adapter, total)) and ranks.main:
        log.warning(warning)
    config["schedule"] = {"steps_per_epoch": per_epoch, "total_steps": total}  # the export's epoch counts
    if ranks.main:
        if estimate := _estimate_memory(cfg):
            config["memory_estimate"] = estimate
        run.write_config({**config, "method_report": method.report(trainer.unet)})
    train_log = TrainLog(run, cfg.log_with, losses, write=ranks.main)
    previews = Previews(pipe, cfg, run, autocast_dtype, device) if cfg.sample_every and ranks.main else None

    checkpoints = Checkpoints(run, cfg.keep_checkpoints, done, cfg.lr)

    def save(step: int) -> None:  # one writer; every process holds the same state and checks it
        checkpoints.save(step, trainer.unet, trainer.optimizer, trainer.scaler, rng, losses, events, config,
                         trainer.schedule, write=ranks.main)

    def preview(step: int) -> None:
        path, grid = previews.render(step)
        train_log.image(step, grid)
        if on_event is not None:
            on_event({"step": step, "total": total, "samples": str(path)})

    first, start = done + 1, time.perf_counter()
    progress = tqdm(total=total, initial=done, desc=f"train {cfg.method}", unit="step", disable=not ranks.main)
    # The bar ends its line and the log closes whatever happens.
    with progress, stop_requests(should_stop) as stop_requested, closing(train_log):
        pending = trainer.begin() if done == 0 else []  # shown with the first step's events
        if previews is not None and done == 0:
            preview(0)  # the base, before any step
        for step in range(done + 1, total + 1):
            if ranks.any(stop_requested()):  # every process stops at the same step
                break
            index = epoch_batches(data.buckets, global_batch, cfg.seed, (step - 1) // per_epoch)[(step - 1) % per_epoch]
            try:
                loss, new = trainer.accumulated_step(step, _draw(data, index, step, rng, trainer, ranks, cfg))
                new, pending = pending + new, []
            except FloatingPointError as e:
                raise checkpoints.diverged(str(e)) from None
            losses.append(loss)
            events += new
            done = step
            progress.update()
            progress.set_postfix(loss=f"{loss:.4f}")
            logged = train_log.step(step, loss, trainer.rates, trainer.grad_norm)
            if on_event is not None and ranks.main:
                it_s = (step - first + 1) / (time.perf_counter() - start)
                on_event({"step": step, "total": total, "loss": loss, "it_s": it_s, "eta_s": (total - step) / it_s,
                          **logged, "events": new})
            if previews is not None and previews.due(step, total):
                preview(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                save(step)
        progress.close()
        _finish(run, save, done, total, trainer.unet, config, method, ranks, stop_requested)
    return run.path




def _draw(data: TrainingData, index: list[int], step: int, rng: torch.Generator, trainer: Trainer, ranks: Ranks,
          cfg: TrainConfig) -> list[Part]:
    """This step's parts (batch, noise, timesteps, share) for this process from the global batch `index`.

    Every process draws the global batch's views, captions, noise and timesteps from the shared seed, then trains
    on its slice of each of the (up to) `gradient_accumulation_steps` parts: the same numbers as one process with
    the whole batch at once.
    """
    views, captions = data.views(index, rng), data.captions(index, step)
    shape = data.latent_shape(index[0])  # one bucket per batch
    noise = torch.randn((len(index), *shape), generator=rng)  # (global B, 4, h, w)
    timesteps = torch.randint(0, trainer.noise_scheduler.config.num_train_timesteps, (len(index),), generator=rng)
    if cfg.noise_offset:  # one constant per image and channel, as diffusers' --noise_offset; drawn last, so a run
        noise += cfg.noise_offset * torch.randn((len(index), shape[0], 1, 1), generator=rng)  # without it is as before
    per_part, parts = cfg.batch_size * ranks.world, []
    for begin in range(0, len(index), per_part):
        local = [begin + i for i in ranks.local(range(per_part), cfg.batch_size) if begin + i < len(index)]
        batch = data.batch([index[i] for i in local], [views[i] for i in local],
                           [captions[i] for i in local]) if local else None
        parts.append(Part(batch, noise[local].to(cfg.device), timesteps[local].to(cfg.device),
                          len(local) * ranks.world / len(index)))
    return parts


def _trainer(pipe: StableDiffusionXLPipeline, cfg: TrainConfig, data: TrainingData, device: str,
             autocast_dtype: torch.dtype | None, ranks: Ranks, checkpoint: Checkpoint | None, total: int) -> Trainer:
    """Inject the adapter into the U-Net, restore a checkpoint's state, and return what the steps need."""
    unet = _prepare_unet(pipe.unet, cfg, device)
    if checkpoint is not None:  # before the optimizer: structure a method builds while training must exist first
        opdiff.load_training_state_dict(unet, checkpoint.adapter)
    groups = opdiff.param_groups(unet, cfg.lr, relative=cfg.optimizer in RELATIVE_LR)
    optimizer = build_optimizer(cfg.optimizer, groups, cfg.weight_decay, cfg.lr_warmup_steps)
    schedule = lr_schedule(optimizer, cfg, total)  # before loading: the saved optimizer holds the scheduled rates
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=autocast_dtype is torch.float16)
    if checkpoint is not None:
        restore_optimizer(optimizer, checkpoint.optimizer)  # the moments; lr and the like from the settings
        scaler.load_state_dict(checkpoint.scaler)
        if checkpoint.scheduler is not None:  # runs from before schedules were constant: nothing to restore
            schedule.load_state_dict(checkpoint.scheduler)
            # The schedule's position from the checkpoint, its base rates from the settings (which may change).
            schedule.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
            for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas,
                                           strict=True):
                group["lr"] = base * factor(schedule.last_epoch)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    trainer = Trainer(unet, optimizer, noise_scheduler, autocast_dtype, scaler, ranks,
                      forward=torch.compile(unet, backend=cfg.compile) if cfg.compile else None, schedule=schedule,
                      max_grad_norm=cfg.max_grad_norm, snr_gamma=cfg.snr_gamma)
    probes: list[tuple] = []

    @torch.no_grad()
    def probe_loss(n: int) -> float:
        """The mean loss on the first n fixed probe batches (made on first use)."""
        if len(probes) < n:
            probes[:] = probe_batches(data, noise_scheduler.config.num_train_timesteps, cfg.seed, n)
        with opdiff.materialize(unet):
            return sum(diffusion_loss(unet, noise_scheduler, *p).item() for p in probes[:n]) / n

    trainer.probe_loss = probe_loss
    return trainer


def _estimate_memory(cfg: TrainConfig) -> dict | None:
    """The run's memory estimate on an accelerator, logged and kept in config.json (`pipelines.memory`); None on
    the CPU, where building the estimate costs more than it tells."""
    if torch.device(cfg.device).type == "cpu":
        return None
    try:
        estimate = estimate_memory(cfg)
    except Exception as e:  # noqa: BLE001 - advice only: a base the estimate cannot read still trains
        log.warning("no memory estimate (%s: %s)", type(e).__name__, e)
        return None
    log.info("%s", estimate.summary())
    return estimate.to_dict()


def _prepare_unet(unet: torch.nn.Module, cfg: TrainConfig, device: str) -> torch.nn.Module:
    """Inject the adapter (seeded), keep its trainable tensors float32 over a 16-bit base, move to `device`."""
    torch.manual_seed(cfg.seed)  # adapter init (PEFT's kaiming A, OP's MLPs) draws from the global generator
    opdiff.inject(unet, cfg.adapter)
    for p in opdiff.trainable_parameters(unet):
        p.data = p.data.float()  # AdamW on 16-bit weights loses small updates; the frozen base may stay 16-bit
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet.to(device)


def _finish(run: RunDir, save: Callable[[int], None], done: int, total: int, unet: torch.nn.Module, config: dict,
            method: opdiff.Method, ranks: Ranks, stop: StopRequests) -> None:
    """Save the last checkpoint, export the collapsed LoRA (named partial when steps are left), and say how a
    stopped run continues; raise TrainingInterrupted when a signal stopped it."""
    save(done)
    lora = run.lora_for(done, total)
    if ranks.main:
        report = method.report(unet)
        if report:
            log.info("%s: %s", method.name, ", ".join(f"{k} = {v:,}" if isinstance(v, int) else f"{k} = {v}"
                                                      for k, v in report.items()))
        config = {**config, "method_report": report}
        run.write_config(config)  # what `opdiff export` reads back: the same header as this export's
        export(unet, lora, run_config=config)
    ranks.barrier()
    if done >= total:
        return
    message = (f"stopped{stop.by} at step {done} of {total}; checkpoint saved, the LoRA so far is {lora.name}. "
               f"Continue with: opdiff train --resume {run.path}")
    if stop.signum is not None:  # the caller reports it
        raise TrainingInterrupted(stop.signum, message, saved=True)
    if ranks.main:
        log.warning("%s", message)


def _run_dir(cfg: TrainConfig) -> Path:
    """The run folder: the resumed run's, `output_dir`, or a new `runs/<method>-<date-time>`."""
    if cfg.resume is not None:
        if cfg.output_dir is not None and Path(cfg.output_dir).resolve() != Path(cfg.resume).resolve():
            raise ValueError(f"a resumed run writes into its own folder {cfg.resume}, not {cfg.output_dir}")
        return Path(cfg.resume)
    if cfg.output_dir is not None:
        return Path(cfg.output_dir)
    return Path("runs") / f"{cfg.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _scan(cfg: TrainConfig, run: RunDir) -> Dataset:
    """Scan the dataset (a zip goes into the run folder, which `RunDir.claim` removes again if the scan fails)."""
    return scan_dataset(cfg.data, caption=cfg.caption, extract_to=run.dataset_dir)
