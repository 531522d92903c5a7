"""Training on the bundled tiny SDXL: every method lowers the loss, never touches the base, writes its run files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

import opdiff
from pipelines.cli import build_parser
from pipelines.config import TrainConfig, config_from_args, field_docs
from pipelines.data import scan_dataset
from pipelines.model import load_pipeline
from pipelines.train import diffusion_loss, encode_dataset, train, training_step

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = list(opdiff.METHODS)
SELECTING = ("lora-over-mpop", "lora-over-mpor")  # methods that choose matrices while training


def _base_tensors(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _assert_base_unchanged(unet: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every base tensor is bit-for-bit what it was; PEFT moves adapted ones to `<module>.base_layer.<name>`."""
    after = unet.state_dict()
    for key, value in before.items():
        module, name = key.rsplit(".", 1)
        moved = f"{module}.base_layer.{name}"
        assert torch.equal(after[moved if moved in after else key], value), key


@pytest.mark.parametrize("method", METHODS)
def test_train_writes_run_files_and_leaves_base_untouched(method, bundled_model, demo_subset, quick_settings, tmp_path):
    pipe = load_pipeline(bundled_model, device="cpu")
    before = _base_tensors(pipe.unet)
    cfg = TrainConfig(data=demo_subset(2), output_dir=tmp_path / "run", max_steps=3, lr=1e-3, **quick_settings(method))
    events = []
    run_dir = train(cfg, on_event=events.append, pipe=pipe)

    assert run_dir == tmp_path / "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == method and config["adapter"]["method"] == method
    assert config["train"]["resolution"] == 64  # native size of the bundled model: 8 latent px x 8
    assert config["train"]["max_steps"] == 3
    assert config["dataset"]["images"] == 2 and config["dataset"]["hash"] == scan_dataset(cfg.data).hash
    assert config["base"] == str(bundled_model)
    with (run_dir / "losses.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(0.0 < float(r["loss"]) < 10.0 for r in rows)
    assert [e["step"] for e in events] == [1, 2, 3] and {e["total"] for e in events} == {3}
    assert set(events[0]) == {"step", "total", "loss", "it_s", "eta_s"} and events[-1]["eta_s"] == 0.0
    assert (run_dir / "adapter_training.safetensors").is_file() and (run_dir / "lora.safetensors").is_file()
    if method in SELECTING:
        assert json.loads((run_dir / "selection.json").read_text()), "selection chose nothing"
    _assert_base_unchanged(pipe.unet, before)


@pytest.mark.parametrize("method", METHODS)
def test_training_on_a_fixed_batch_lowers_its_loss(method, bundled_model, demo_subset, quick_settings):
    pipe = load_pipeline(bundled_model, device="cpu")
    batch = encode_dataset(pipe, scan_dataset(demo_subset(2)), 64)
    unet = pipe.unet
    torch.manual_seed(0)
    opdiff.inject(unet, TrainConfig(**quick_settings(method)).adapter_config())
    optimizer = torch.optim.AdamW(opdiff.param_groups(unet, 1e-3))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))  # (2, 4, 8, 8)
    timesteps = torch.tensor([300, 700])

    @torch.no_grad()
    def loss() -> float:
        with opdiff.materialize(unet):
            return diffusion_loss(unet, scheduler, batch, noise, timesteps).item()

    first = loss()
    for step in range(1, 6):
        training_step(unet, optimizer, scheduler, batch, noise, timesteps, step, eval_loss=loss)
    assert loss() < first - 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_exports_float32(precision, bundled_model, demo_subset, tmp_path):
    cfg = TrainConfig(data=demo_subset(1), output_dir=tmp_path / "run", method="op-lora", max_steps=2,
                      mixed_precision=precision)
    run_dir = train(cfg)
    losses = [float(line.split(",")[1]) for line in (run_dir / "losses.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(0.0 < x < 10.0 for x in losses)
    assert {v.dtype for v in load_file(run_dir / "lora.safetensors").values()} == {torch.float32}


def test_checkpoints_are_written_while_training(bundled_model, demo_subset, tmp_path):
    seen = []

    def on_event(event: dict) -> None:  # runs before the step's own checkpoint: sees the previous one
        csv_file = tmp_path / "run" / "losses.csv"
        rows = len(csv_file.read_text().splitlines()) - 1 if csv_file.exists() else 0
        seen.append((event["step"], rows, (tmp_path / "run" / "adapter_training.safetensors").exists()))

    cfg = TrainConfig(data=demo_subset(1), output_dir=tmp_path / "run", max_steps=5, checkpoint_every=2)
    train(cfg, on_event=on_event)
    assert seen == [(1, 0, False), (2, 0, False), (3, 2, True), (4, 2, True), (5, 4, True)]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_training_is_reproducible_from_the_seed(bundled_model, demo_subset, tmp_path):
    data = demo_subset(3)

    def losses(seed: int, name: str) -> list[str]:
        cfg = TrainConfig(data=data, output_dir=tmp_path / name, method="op-lora", max_steps=4, seed=seed)
        return (train(cfg) / "losses.csv").read_text().splitlines()

    first = losses(0, "a")
    assert losses(0, "b") == first
    assert losses(1, "c") != first


def test_every_adapter_setting_is_a_train_setting_with_the_same_default():
    train_fields = {f.name: f for f in fields(TrainConfig)}
    for f in fields(opdiff.AdapterConfig):
        assert f.name in train_fields, f"TrainConfig lacks adapter setting {f.name}"
    assert TrainConfig().adapter_config() == opdiff.AdapterConfig()


def test_every_setting_has_help_text():
    docs = {**field_docs(opdiff.AdapterConfig), **field_docs(TrainConfig)}
    assert {f.name for f in fields(TrainConfig)} <= set(docs)


def test_cli_train_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out.stdout
    for method in METHODS:
        assert method in out.stdout
    assert "--config FILE" in out.stdout


@pytest.mark.parametrize("command", ["sample", "export", "demo"])
def test_cli_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert f"opdiff {command}" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_then_flags(suffix, tmp_path):
    path = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        path.write_text('method = "op-lora"\nrank = 8\nlr = 0.001\nsample_prompts = ["a", "b"]\n')
    else:
        path.write_text(json.dumps({"method": "op-lora", "rank": 8, "lr": 0.001, "sample_prompts": ["a", "b"]}))
    args = build_parser().parse_args(["train", "--config", str(path), "--rank", "16"])
    cfg = config_from_args(args)
    assert (cfg.method, cfg.rank, cfg.lr, cfg.sample_prompts) == ("op-lora", 16, 1e-3, ("a", "b"))
    assert cfg.adapter_config().rank == 16


def test_config_file_with_unknown_keys_names_them(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"method": "lora", "learning_rate": 1, "ranks": 4}))
    args = build_parser().parse_args(["train", "--config", str(path)])
    with pytest.raises(ValueError, match="unknown setting\\(s\\): learning_rate, ranks"):
        config_from_args(args)


def test_run_config_json_is_a_config_file(bundled_model, demo_subset, tmp_path):
    cfg = TrainConfig(data=demo_subset(1), output_dir=tmp_path / "run", method="dora", max_steps=1, rank=2)
    run_dir = train(cfg)
    args = build_parser().parse_args(["train", "--config", str(run_dir / "config.json"), "--max-steps", "2"])
    again = config_from_args(args)
    assert (again.method, again.rank, again.max_steps, again.resolution) == ("dora", 2, 2, 64)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"method": "lorax"}, "unknown method 'lorax'"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"resolution": 100}, "multiple of 8"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ],
)
def test_bad_settings_are_rejected_up_front(settings, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**settings)


def test_unloadable_base_names_what_was_tried(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="(?s)could not load an SDXL base model .*as a single-file checkpoint"):
        load_pipeline(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="as a hub id"):
        load_pipeline("no-such-org/no-such-model")
