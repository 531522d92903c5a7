"""The training options peers offer, on the bundled model: each one does what its formula or its peer says.

Expected values come from the reference implementations, computed here: the schedule from diffusers'
`get_scheduler`, SNR from diffusers' `compute_snr`, the velocity from its definition.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from safetensors.torch import load_file

import opdiff
import pipelines.step
from pipelines import presets
from pipelines.captions import CaptionRules
from pipelines.cli import main
from pipelines.config import TrainConfig, resume_config
from pipelines.data import scan_dataset
from pipelines.distributed import SINGLE_PROCESS
from pipelines.encoding import encode_caption, encode_dataset
from pipelines.jobs import TrainingJobs
from pipelines.rundir import RunDir
from pipelines.step import Trainer, diffusion_loss, min_snr_weights
from pipelines.train import _draw, train
from pipelines.training_data import TrainingData

pytestmark = pytest.mark.usefixtures("single_thread", "shared_pipeline")


def _train(data: Path, out: Path, **settings) -> tuple[Path, list[dict]]:
    events: list[dict] = []
    run = train(TrainConfig(data=data, output_dir=out, **{"lr": 1e-3, **settings}), on_event=events.append)
    return run, events


def _steps(events: list[dict]) -> list[dict]:
    return [e for e in events if "loss" in e]


def _losses(run: Path) -> list[float]:
    return [loss for _, loss in RunDir(run).read_losses()]


# -- learning-rate schedules


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                      "polynomial"])
def test_lr_sequence_is_get_schedulers(schedule, demo_subset, tmp_path):
    steps, warmup = 6, 0 if schedule == "constant" else 2
    _, events = _train(demo_subset(1), tmp_path / "run", max_steps=steps, lr_scheduler=schedule,
                       lr_warmup_steps=warmup, lr_num_cycles=2, lr_power=2.0)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps, num_cycles=2,
                              power=2.0)
    expected = []
    for _ in range(steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert [e["lr"] for e in _steps(events)] == pytest.approx(expected, rel=1e-12, abs=0)
    if schedule != "constant":
        assert len(set(expected)) > 1  # the schedule moved


def test_the_default_schedule_is_the_papers_constant_rate():
    cfg = TrainConfig()
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.optimizer, cfg.max_grad_norm) == ("constant", 0, "adamw", None)


def test_a_stopped_run_resumes_with_the_same_rates_and_augmentation(demo_subset, tmp_path):
    """Schedule state from the checkpoint; captions, noise offset and accumulation from (seed, step) and rng."""
    data = demo_subset(3)
    settings = {"max_steps": 4, "lr_scheduler": "cosine", "lr_warmup_steps": 1, "gradient_accumulation_steps": 2,
                "noise_offset": 0.1, "snr_gamma": 5.0, "max_grad_norm": 0.5, "trigger_word": "sks",
                "caption_dropout_rate": 0.3, "shuffle_caption": True, "random_crop": True, "flip": True}
    full, full_events = _train(data, tmp_path / "full", **settings)
    events: list[dict] = []
    cfg = TrainConfig(data=data, output_dir=tmp_path / "part", lr=1e-3, **settings)
    train(cfg, on_event=events.append, should_stop=lambda: len(events) >= 2)
    train(resume_config(tmp_path / "part"), on_event=events.append)
    assert [(e["loss"], e["lr"]) for e in events] == [(e["loss"], e["lr"]) for e in _steps(full_events)]
    for name in ("adapter_training.safetensors", "lora.safetensors"):
        a, b = load_file(full / name), load_file(tmp_path / "part" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lr_scheduler cosine spreads its decay over the run's 4 steps"):
        train(resume_config(tmp_path / "part", max_steps=6))


# -- gradient accumulation and clipping


def test_accumulation_steps_like_the_bigger_batch(demo_subset, tmp_path):
    data = demo_subset(4)  # one bucket: every step is one batch of 4 images
    big, _ = _train(data, tmp_path / "big", max_steps=3, batch_size=4, method="op-lora")
    small, _ = _train(data, tmp_path / "small", max_steps=3, batch_size=2, gradient_accumulation_steps=2,
                      method="op-lora")
    assert _losses(small) == pytest.approx(_losses(big), abs=1e-6)
    a, b = load_file(big / "adapter_training.safetensors"), load_file(small / "adapter_training.safetensors")
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    assert float(diff.norm() / torch.cat([a[k].flatten() for k in a]).norm()) < 1e-5


def _adapted_trainer(pipe, data: Path, **options) -> tuple[Trainer, tuple]:
    """A LoRA on the shared pipeline's U-Net and a fixed batch of the images in `data`."""
    batch = encode_dataset(pipe, scan_dataset(data), 64)
    torch.manual_seed(0)
    opdiff.inject(pipe.unet, opdiff.AdapterConfig())
    optimizer = torch.optim.AdamW(opdiff.param_groups(pipe.unet, 1e-3))
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))
    trainer = Trainer(pipe.unet, optimizer, DDPMScheduler.from_config(pipe.scheduler.config), **options)
    return trainer, (batch, noise, torch.tensor([300, 700]))


@pytest.mark.parametrize("max_norm", [None, 1e-4])
def test_clipping_bounds_the_gradient_norm(max_norm, shared_pipeline, demo_subset):
    trainer, inputs = _adapted_trainer(shared_pipeline, demo_subset(2), max_grad_norm=max_norm)
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    trainer.optimizer.register_step_pre_hook(record)
    for step in (1, 2):
        trainer.step(step, *inputs)
    if max_norm is None:
        assert min(norms) > 1e-3 and trainer.grad_norm is None  # the bound below is a real constraint
    else:
        assert max(norms) <= max_norm * (1 + 1e-5)
        assert trainer.grad_norm > 1e-3  # the norm before clipping is what is reported


# -- loss options


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_diffusers(prediction, shared_pipeline, demo_subset):
    scheduler = DDPMScheduler.from_config(shared_pipeline.scheduler.config, prediction_type=prediction)
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction == "epsilon" else snr + 1)
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0), expected, rtol=1e-5)
    assert expected[0] < 1 < 5 < snr[0]  # a low-noise step is weighed down, as Min-SNR intends

    batch = encode_dataset(shared_pipeline, scan_dataset(demo_subset(2)), 64)
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([20, 800])
    unet = shared_pipeline.unet
    with torch.no_grad():
        pred = unet(scheduler.add_noise(batch.latents, noise, t), t, encoder_hidden_states=batch.prompt_embeds,
                    added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids}).sample
        abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        target = noise if prediction == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * batch.latents
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        snr_t = compute_snr(scheduler, t)
        weights = torch.minimum(snr_t, torch.full_like(snr_t, 5.0)) / (snr_t if prediction == "epsilon" else snr_t + 1)
        plain = diffusion_loss(unet, scheduler, batch, noise, t)
        weighted = diffusion_loss(unet, scheduler, batch, noise, t, snr_gamma=5.0)
    assert float(plain) == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert float(weighted) == pytest.approx(float((per_sample * weights).mean()), rel=1e-5)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-3)


def test_noise_offset_adds_one_constant_per_image_and_channel(shared_pipeline, demo_subset):
    data_dir = demo_subset(2)
    cfg = TrainConfig(data=data_dir, resolution=64, noise_offset=0.1, batch_size=2, device="cpu")
    data = TrainingData(shared_pipeline, scan_dataset(data_dir), cfg, "cpu")
    trainer = SimpleNamespace(noise_scheduler=DDPMScheduler.from_config(shared_pipeline.scheduler.config))
    parts = _draw(data, [0, 1], 1, torch.Generator().manual_seed(7), trainer, SINGLE_PROCESS, cfg)
    plain = _draw(data, [0, 1], 1, torch.Generator().manual_seed(7), trainer, SINGLE_PROCESS,
                  cfg.replace(noise_offset=0.0))
    replay = torch.Generator().manual_seed(7)  # diffusers: noise += offset * randn(B, C, 1, 1)
    base = torch.randn(parts[0].noise.shape, generator=replay)
    timesteps = torch.randint(0, 1000, (2,), generator=replay)
    offset = 0.1 * torch.randn((2, base.shape[1], 1, 1), generator=replay)
    assert torch.equal(plain[0].noise, base) and torch.equal(parts[0].timesteps, timesteps)
    assert torch.allclose(parts[0].noise, base + offset)


def test_v_prediction_bases_train_on_the_velocity(bundled_model, demo_subset, tmp_path, monkeypatch):
    base = tmp_path / "v-model"
    shutil.copytree(bundled_model, base)
    config_path = base / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    seen = []
    real = pipelines.step.diffusion_loss

    def recording(unet, noise_scheduler, *args, **kwargs):
        seen.append(noise_scheduler.config.prediction_type)
        return real(unet, noise_scheduler, *args, **kwargs)

    monkeypatch.setattr("pipelines.step.diffusion_loss", recording)
    run, _ = _train(demo_subset(1), tmp_path / "run", base=str(base), max_steps=1)
    assert seen == ["v_prediction"] and RunDir(run).lora.is_file()


# -- captions


def test_trigger_word_and_dropout_reach_the_encoded_captions(shared_pipeline, demo_subset, tmp_path, monkeypatch):
    data = demo_subset(1)
    caption = scan_dataset(data).examples[0].caption
    seen = []
    real = pipelines.step.diffusion_loss

    def recording(unet, noise_scheduler, batch, *args, **kwargs):
        seen.append(batch.prompt_embeds.clone())
        return real(unet, noise_scheduler, batch, *args, **kwargs)

    monkeypatch.setattr("pipelines.step.diffusion_loss", recording)
    _train(data, tmp_path / "trigger", max_steps=2, trigger_word="sks")
    triggered, _ = encode_caption(shared_pipeline, f"sks, {caption}")
    assert all(torch.equal(e[0], triggered) for e in seen) and len(seen) == 2
    seen.clear()
    _train(data, tmp_path / "dropout", max_steps=2, trigger_word="sks", caption_dropout_rate=1.0)
    empty, _ = encode_caption(shared_pipeline, "")
    assert all(torch.equal(e[0], empty) for e in seen) and len(seen) == 2


def test_caption_rules_drop_and_shuffle_as_kohya():
    rules = CaptionRules(trigger_word="sks", dropout_rate=0.25, shuffle=True, keep_tokens=1)
    caption = "a dog, red collar, grass, sunny day, park"
    drawn = [c for step in range(1, 401) for c in rules.step_captions([caption], seed=0, step=step)]
    dropped = drawn.count("")
    assert 60 < dropped < 140  # Binomial(400, 0.25): mean 100, sd 8.7
    kept = [c for c in drawn if c]
    assert all(c.startswith("sks, a dog, ") for c in kept)  # trigger, then the first (kept) tag
    assert all(sorted(c.split(", ")[2:]) == sorted(["red collar", "grass", "sunny day", "park"]) for c in kept)
    assert len(set(kept)) > 10  # the rest is shuffled
    assert rules.step_captions([caption], 0, 5) == rules.step_captions([caption], 0, 5)  # a function of (seed, step)
    assert CaptionRules(trigger_word="sks").step_captions([caption, ""], 0, 1) == [f"sks, {caption}", "sks"]


# -- samples while training, logging


def test_samples_while_training_leave_the_run_unchanged(demo_subset, tmp_path):
    data = demo_subset(2)
    plain, _ = _train(data, tmp_path / "plain", max_steps=5, flip=True)
    sampled, events = _train(data, tmp_path / "sampled", max_steps=5, flip=True, sample_every=2, sample_steps=2,
                             sample_seeds=(0, 1))
    grids = RunDir(sampled).sample_grids()
    assert [step for step, _ in grids] == [0, 2, 4, 5]  # the base, every 2 steps, and the last
    assert [(e["step"], Path(e["samples"])) for e in events if "samples" in e] == grids
    assert _losses(sampled) == _losses(plain)  # the training random stream is untouched
    a, b = load_file(plain / "lora.safetensors"), load_file(sampled / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not RunDir(plain).samples_dir.exists()  # off by default


def test_tensorboard_events_are_written_and_readable(demo_subset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, events = _train(demo_subset(1), tmp_path / "run", max_steps=3, log_with="tensorboard", sample_every=3,
                         sample_steps=2)
    log = EventAccumulator(str(RunDir(run).tensorboard_dir), size_guidance={"images": 0})
    log.Reload()
    assert [e.step for e in log.Scalars("loss")] == [1, 2, 3] == [s for s, _ in RunDir(run).read_losses()]
    assert [e.value for e in log.Scalars("loss")] == pytest.approx([e["loss"] for e in _steps(events)], rel=1e-6)
    assert [e.value for e in log.Scalars("loss/smoothed")] == pytest.approx([e["smoothed_loss"]
                                                                            for e in _steps(events)], rel=1e-6)
    assert [e.value for e in log.Scalars("lr/adapter")] == pytest.approx([1e-3] * 3)
    assert [e.step for e in log.Images("samples")] == [0, 3]


def test_log_with_tensorboard_without_the_package_names_the_extra(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match=r"log_with tensorboard needs the tensorboard package: .*opdiff\[tensorboard\]"):
        train(TrainConfig(output_dir=tmp_path / "run", log_with="tensorboard"))
    assert not (tmp_path / "run").exists()


def test_the_gui_job_lists_the_sample_grids(tmp_path):
    def fake_train(cfg, on_event, should_stop):
        on_event({"step": 0, "total": 2, "samples": str(tmp_path / "samples" / "step-000000.png")})
        on_event({"step": 1, "total": 2, "loss": 0.5, "it_s": 1.0, "eta_s": 1.0, "lr": 1e-4, "events": []})
        on_event({"step": 2, "total": 2, "samples": str(tmp_path / "samples" / "step-000002.png")})
        return cfg.output_dir

    jobs = TrainingJobs(tmp_path, train_fn=fake_train)
    jobs.start(TrainConfig(output_dir=tmp_path / "run"))
    for _ in range(200):
        if not jobs.status().running:
            break
        time.sleep(0.01)
    status = jobs.status()
    assert status.previews == ((0, str(tmp_path / "samples" / "step-000000.png")),
                               (2, str(tmp_path / "samples" / "step-000002.png")))
    assert status.losses == ((1, 0.5),) and status.to_dict()["previews"] == [p for _, p in status.previews]


# -- optimizers


@pytest.mark.parametrize("method", ["lora", "lora-over-mpor"])
def test_prodigy_trains_end_to_end(method, demo_subset, quick_settings, tmp_path):
    """Every group at Prodigy's lr multiplier, LoRA-Over's cores too (their default limit is an absolute rate)."""
    pytest.importorskip("prodigyopt")
    run, events = _train(demo_subset(2), tmp_path / "run", max_steps=3, optimizer="prodigy", lr=1.0,
                         lr_scheduler="constant_with_warmup", lr_warmup_steps=1, **quick_settings(method))
    checkpoint = torch.load(RunDir(run).checkpoint, weights_only=True)
    assert "d" in checkpoint["optimizer"]["param_groups"][0]  # Prodigy's own step-size estimate
    assert RunDir(run).lora.is_file() and len(_losses(run)) == 3
    assert [e["lr"] for e in _steps(events)] == [0.0, 1.0, 1.0]


def test_8bit_adamw_trains_on_the_cpu(demo_subset, tmp_path):
    pytest.importorskip("bitsandbytes")
    run, _ = _train(demo_subset(1), tmp_path / "run", max_steps=2, optimizer="adamw8bit", method="op-lora")
    state = torch.load(RunDir(run).checkpoint, weights_only=True)["optimizer"]["state"]
    assert all({"__bnb_optimizer_quant_state__", "absmax1"} & set(s) for s in state.values())  # bitsandbytes' state
    train(resume_config(run, max_steps=3))  # its state loads back
    assert len(_losses(run)) == 3


def test_8bit_adamw_on_an_unsupported_device_stops_before_any_work(tmp_path):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="optimizer adamw8bit: bitsandbytes .* has no 8-bit optimizer for mps"):
        train(TrainConfig(output_dir=tmp_path / "run", optimizer="adamw8bit", device="mps"))
    assert not (tmp_path / "run").exists()


def test_a_missing_optimizer_package_names_the_extra(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(ValueError, match=r"optimizer prodigy needs the prodigyopt package: .*opdiff\[prodigy\]"):
        train(TrainConfig(output_dir=tmp_path / "run", optimizer="prodigy"))


# -- presets, --dry-run, refusals


def test_a_preset_runs_end_to_end_under_the_flags(demo_subset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "cpu-quick", "--data", str(demo_subset(2)), "--max-steps", "3",
                 "--sample-steps", "2", "--output-dir", str(out)]) == 0
    settings = RunDir(out).read_config()["train"]
    preset = presets.settings("cpu-quick")
    assert settings["preset"] == "cpu-quick" and settings["lr"] == preset["lr"] != TrainConfig().lr
    assert settings["max_steps"] == 3 and settings["sample_steps"] == 2  # flags over the preset
    assert [step for step, _ in RunDir(out).sample_grids()] == [0, 3]


def test_every_preset_is_valid_and_described():
    for name in presets.names():
        preset = presets.load(name)
        cfg = TrainConfig(preset=name)
        assert preset.description and all(cfg.to_dict()[k] == TrainConfig.from_dict({k: v}).to_dict()[k]
                                          for k, v in preset.settings.items())
    assert {"cpu-quick", "naruto", "monet", "sdxl-12gb", "sdxl-16gb", "sdxl-24gb"} <= set(presets.names())


def test_dry_run_prints_an_estimate_and_trains_nothing(tmp_path, capsys):
    assert main(["train", "--dry-run", "--output-dir", str(tmp_path / "run"), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak accelerator memory:" in out and "batch_size=2" in out and "nothing trained" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr-warmup-steps", "-1"], "lr_warmup_steps must be >= 0"),
    (["--caption-dropout-rate", "1.5"], "caption_dropout_rate must be <= 1"),
    (["--lr-scheduler", "cosine_warm"], "invalid choice: 'cosine_warm'"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--lr-warmup-steps", "5"], "lr_warmup_steps needs a schedule with a warm-up"),
    (["--optimizer", "adamw8bit", "--device", "mps"], "optimizer adamw8bit: bitsandbytes"),
])
def test_invalid_options_stop_before_any_work(flags, message, tmp_path, capsys):
    if "adamw8bit" in flags:
        pytest.importorskip("bitsandbytes")
    assert main(["train", "--output-dir", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("settings", "message"), [
    ({"lr_warmup_steps": -1}, "lr_warmup_steps must be >= 0"),
    ({"caption_dropout_rate": 1.5}, "caption_dropout_rate must be <= 1"),
    ({"lr_scheduler": "cosine_warm"}, "unknown lr_scheduler 'cosine_warm'"),
    ({"preset": "nope"}, "unknown preset 'nope'; choose one of: cpu-quick"),
    ({"optimizer": "sgd"}, "unknown optimizer 'sgd'"),
])
def test_invalid_options_in_files_and_forms_name_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(settings)


def test_the_gui_preset_field_fills_the_form(tmp_path):
    import app

    updates = dict(zip([s.name for s in app.form_settings()], app.App(tmp_path).apply_preset("sdxl-12gb"),
                       strict=False))
    assert updates["resolution"]["value"] == 1024 and updates["mixed_precision"]["value"] == "bf16"
    assert updates["gradient_checkpointing"]["value"] is True and updates["lr"]["value"] == TrainConfig().lr
    assert "value" not in updates["data"]  # the chosen dataset stays


def test_the_memory_estimate_adds_up_what_training_holds(shared_pipeline):
    from pipelines.memory import estimate_memory

    base = estimate_memory(TrainConfig(method="op-lora", sample_every=10))
    parts = base.train_parts
    unet = shared_pipeline.unet.requires_grad_(False)
    opdiff.inject(unet, opdiff.AdapterConfig(method="op-lora"))  # as training holds it
    trainable = sum(p.numel() for p in opdiff.trainable_parameters(unet))
    held = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    assert parts["weights"] == held - 4 * trainable  # the bundled U-Net and the adapter's frozen tensors, float32
    assert parts["adapter"] == parts["gradients"] == 4 * trainable and parts["optimizer state"] == 8 * trainable
    assert base.phases["train"] == pytest.approx(sum(parts.values()), rel=0.01)
    assert base.phases["samples"] > parts["weights"] and base.total > base.peak == max(base.phases.values())
    bigger = estimate_memory(TrainConfig(method="op-lora", batch_size=4, resolution=128))
    assert bigger.train_parts["activations"] > 4 * parts["activations"] and "samples" not in bigger.phases
    smaller = estimate_memory(TrainConfig(method="op-lora", batch_size=4, resolution=128, optimizer="prodigy",
                                          gradient_checkpointing=True))
    assert smaller.train_parts["optimizer state"] == 16 * trainable
    assert smaller.train_parts["activations"] < bigger.train_parts["activations"]


def test_the_memory_estimate_counts_the_layers_a_selection_gives_cores():
    """MPOP/MPOR end with the selected share of each group as MPO: their estimate holds those cores. With every
    layer selected it is lora-over-mpo's adapter; with 3 of 4 it lies between plain LoRA's and that."""
    from pipelines.memory import estimate_memory

    def adapter(method: str, **settings) -> int:
        return estimate_memory(TrainConfig(method=method, **settings)).train_parts["adapter"]

    lora, mpo = adapter("lora"), adapter("lora-over-mpo")
    for method in ("lora-over-mpop", "lora-over-mpor"):
        assert adapter(method, select_fraction=1.0) == mpo
        assert lora < adapter(method) < mpo
