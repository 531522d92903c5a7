"""Training on the bundled tiny SDXL: every method lowers the loss, never touches the base, writes its run files;
the latent cache, aspect-ratio buckets, mixed precision, gradient checkpointing and the VAE override."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import opdiff
from pipelines.cli import build_parser, main
from pipelines.config import TrainConfig, config_from_args
from pipelines.data import View, center_view, load_view, scan_dataset
from pipelines.encoding import encode_dataset, encode_image
from pipelines.model import fingerprint, load_pipeline
from pipelines.rundir import RunDir
from pipelines.step import Trainer, adamw, diffusion_loss
from pipelines.train import train
from pipelines.training_data import TrainingData, epoch_batches

pytestmark = pytest.mark.usefixtures("single_thread", "shared_pipeline")

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
    assert set(events[0]) == {"step", "total", "loss", "it_s", "eta_s", "lr", "smoothed_loss", "events"}
    # The first parameter group's rate: LoRA-Over's cores alone train at min(lr, 1e-2 / m^2) (m cores; the defaults
    # of mpo_lr_power and mpo_lr_cap): the main 1e-3 for SVD (m = 2), 1e-2 / 25 for MPO (m = 5).
    first_group = {"lora-over-mpo": 4e-4}.get(method, 1e-3)
    assert events[-1]["eta_s"] == 0.0 and [e["lr"] for e in events] == pytest.approx([first_group] * 3)
    assert (run_dir / "adapter_training.safetensors").is_file() and (run_dir / "lora.safetensors").is_file()
    if method in SELECTING:
        assert RunDir(run_dir).read_events(), "selection chose nothing"
    _assert_base_unchanged(pipe.unet, before)


def test_mpop_scores_a_finished_lora_run_and_trains_from_the_base(bundled_model, demo_subset, quick_settings,
                                                                     tmp_path):
    """lora-over.txt Alg. 2 as the paper runs it: a trained LoRA run is scored by Eq. 7 before the first step; the
    chosen layers then train as MPO from the base, and the run exports as usual."""
    pipe = load_pipeline(bundled_model, device="cpu")
    settings = quick_settings("lora-over-mpop")
    targets = {"target_modules": settings["target_modules"]}
    data = demo_subset(2)
    lora_run = train(TrainConfig(data=data, output_dir=tmp_path / "lora", max_steps=3, lr=1e-3, method="lora",
                                 **targets), pipe=pipe)
    cfg = TrainConfig(data=data, output_dir=tmp_path / "mpop", max_steps=2, lr=1e-3,
                      **{**settings, "select_from": lora_run, "select_top_n": None, "select_fraction": 0.5})
    events = []
    run_dir = train(cfg, on_event=events.append, pipe=load_pipeline(bundled_model, device="cpu"))
    chosen = RunDir(run_dir).read_events()
    assert chosen and {e["step"] for e in chosen} == {0} and {e["matrix"] for e in chosen} == {"A and B"}
    assert events[0]["events"] == chosen, "the choice made before step 1 is shown with step 1"
    per_group = {}
    for e in chosen:
        per_group[e["group"]] = per_group.get(e["group"], 0) + 1
    layers = json.loads((run_dir / "config.json").read_text())["adapter"]
    assert layers["select_from"] == str(lora_run)
    state = load_file(run_dir / "adapter_training.safetensors")
    assert any(".cores." in k for k in state) and (run_dir / "lora.safetensors").is_file()
    assert all(n >= 1 for n in per_group.values())
    shipped = sorted(run_dir.glob("lora*.safetensors"))
    assert len(shipped) == 2  # diffusers and kohya
    for file in shipped:
        with safe_open(str(file), "pt") as f:
            header = json.dumps(f.metadata())
        assert "select_from" in header and str(tmp_path) not in header, f"{file.name} names a path of this machine"


@pytest.mark.parametrize("method", METHODS)
def test_training_on_a_fixed_batch_lowers_its_loss(method, bundled_model, demo_subset, quick_settings):
    pipe = load_pipeline(bundled_model, device="cpu")
    batch = encode_dataset(pipe, scan_dataset(demo_subset(2)), 64)
    unet = pipe.unet
    torch.manual_seed(0)
    opdiff.inject(unet, TrainConfig(**quick_settings(method)).adapter)
    optimizer = torch.optim.AdamW(opdiff.param_groups(unet, 1e-3))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))  # (2, 4, 8, 8)
    timesteps = torch.tensor([300, 700])

    @torch.no_grad()
    def loss() -> float:
        with opdiff.materialize(unet):
            return diffusion_loss(unet, scheduler, batch, noise, timesteps).item()

    first = loss()
    trainer = Trainer(unet, optimizer, scheduler, probe_loss=lambda n: loss())
    for step in range(1, 6):
        trainer.step(step, batch, noise, timesteps)
    assert loss() < first - 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_exports_float32(precision, bundled_model, demo_subset, tmp_path):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    pipe = load_pipeline(bundled_model, dtype=dtype, device="cpu")
    assert (pipe.unet.dtype, pipe.text_encoder_2.dtype, pipe.vae.dtype) == (dtype, dtype, torch.float32)
    cfg = TrainConfig(data=demo_subset(1), output_dir=tmp_path / "run", method="op-lora", max_steps=2,
                      mixed_precision=precision)
    run_dir = train(cfg, pipe=pipe)
    losses = [float(line.split(",")[1]) for line in (run_dir / "losses.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(0.0 < x < 10.0 for x in losses)
    assert {v.dtype for v in load_file(run_dir / "adapter_training.safetensors").values()} == {torch.float32}
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
    train = {s.name: s for s in TrainConfig.settings()}
    for s in opdiff.AdapterConfig.settings():
        assert s.name in train and train[s.name].default == s.default, s.name
    assert TrainConfig().adapter == opdiff.AdapterConfig()
    assert TrainConfig(rank=8, op_width=16).adapter == opdiff.AdapterConfig(rank=8, op_width=16)


def test_every_setting_has_help_text():
    from pipelines.evaluate import CmmdConfig, EvalConfig
    from pipelines.export import ExportConfig
    from pipelines.reproduce import ReproduceConfig
    from pipelines.sample import SampleConfig

    for cls in (TrainConfig, SampleConfig, ExportConfig, EvalConfig, CmmdConfig, ReproduceConfig):
        settings = cls.settings()
        assert settings and all(len(s.help.split()) >= 3 for s in settings), cls.__name__
        assert len({s.name for s in settings}) == len(settings), f"{cls.__name__} has a setting twice"


def test_cli_train_help_lists_every_flag(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for s in TrainConfig.settings():
        assert s.flag in out
    for method in METHODS:
        assert method in out
    assert "--config FILE" in out


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
    assert (cfg.adapter.method, cfg.adapter.rank, cfg.lr, cfg.sample_prompts) == ("op-lora", 16, 1e-3, ("a", "b"))


def test_config_file_with_unknown_keys_names_them(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"method": "lora", "learning_rate": 1, "ranks": 4}))
    args = build_parser().parse_args(["train", "--config", str(path)])
    with pytest.raises(ValueError, match="unknown setting\\(s\\) in .*run.json: learning_rate, ranks"):
        config_from_args(args)


def test_run_config_json_is_a_config_file(bundled_model, demo_subset, tmp_path):
    cfg = TrainConfig(data=demo_subset(1), output_dir=tmp_path / "run", method="dora", max_steps=1, rank=2)
    run_dir = train(cfg)
    args = build_parser().parse_args(["train", "--config", str(run_dir / "config.json"), "--max-steps", "2"])
    again = config_from_args(args)
    assert (again.adapter.method, again.adapter.rank, again.max_steps, again.resolution) == ("dora", 2, 2, 64)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"method": "lorax"}, "unknown method 'lorax'"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"resolution": 100}, "multiple of 8"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"mixed_precision": "fp8"}, "unknown mixed_precision 'fp8'; choose one of: no, bf16, fp16"),
        ({"compile": "fastest"}, "compile must be a torch.compile backend"),
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


def _counting(module: torch.nn.Module, method: str | None = None) -> list[int]:
    """Count calls of `module` (a forward hook) or of its `method` (wrapped on this instance only)."""
    calls = []
    if method is None:
        module.register_forward_hook(lambda *args: calls.append(1))
        return calls
    original = getattr(module, method)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, method, counted)
    return calls


@pytest.mark.parametrize("flip", [False, True])
def test_cached_and_uncached_batches_give_the_same_loss(flip, bundled_model, demo_subset):
    pipe = load_pipeline(bundled_model, device="cpu")
    dataset = scan_dataset(demo_subset(3))
    settings = {"resolution": 64, "flip": flip}
    cached = TrainingData(pipe, dataset, TrainConfig(cache_latents=True, **settings), "cpu")
    vae_calls = _counting(pipe.vae, "encode")
    uncached = TrainingData(pipe, dataset, TrainConfig(cache_latents=False, **settings), "cpu")
    index = [2, 0, 1]
    views = cached.views(index, torch.Generator().manual_seed(3))
    assert uncached.views(index, torch.Generator().manual_seed(3)) == views
    assert any(v.flip for v in views) == flip
    a, b = cached.batch(index, views), uncached.batch(index, views)
    assert len(vae_calls) == 3  # the uncached path encoded this batch; the cached one only sliced
    for name in ("latents", "prompt_embeds", "pooled", "time_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noise, t = torch.randn(a.latents.shape, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500, 900])
    with torch.no_grad():
        loss_a, loss_b = (diffusion_loss(pipe.unet, scheduler, x, noise, t).item() for x in (a, b))
    assert loss_a == loss_b


def test_uncached_training_follows_the_cached_loss_curve(bundled_model, demo_subset, tmp_path):
    data = demo_subset(2)

    def losses(cache_latents: bool) -> list[float]:
        events = []
        train(TrainConfig(data=data, output_dir=tmp_path / str(cache_latents), max_steps=3, flip=True,
                          cache_latents=cache_latents), on_event=events.append)
        return [e["loss"] for e in events]

    assert losses(True) == losses(False)


def test_disk_cache_is_hit_on_the_second_run(bundled_model, demo_subset, tmp_path):
    data, cache = demo_subset(2), tmp_path / "cache"
    runs = []
    for name in ("first", "second"):
        pipe = load_pipeline(bundled_model, device="cpu")
        vae_calls = _counting(pipe.vae, "encode")
        text_calls = [_counting(pipe.text_encoder), _counting(pipe.text_encoder_2)]
        events = []
        train(TrainConfig(data=data, output_dir=tmp_path / name, max_steps=2, flip=True, cache_dir=cache),
              on_event=events.append, pipe=pipe)
        runs.append((len(vae_calls), sum(map(len, text_calls)), [e["loss"] for e in events]))
    (first_vae, first_text, first_losses), (second_vae, second_text, second_losses) = runs
    assert (first_vae, first_text) == (4, 4)  # two images, each also mirrored; two captions, two text encoders
    assert (second_vae, second_text) == (0, 0)
    assert second_losses == first_losses
    assert len(list((cache / "latents").glob("*.safetensors"))) == 2
    assert len(list((cache / "text").glob("*.safetensors"))) == 2


def test_cache_key_follows_image_content_and_model_weights(bundled_model, demo_subset, tmp_path):
    data, cache = demo_subset(1), tmp_path / "cache"
    pipe = load_pipeline(bundled_model, device="cpu")
    cfg = TrainConfig(resolution=64, cache_dir=cache)
    TrainingData(pipe, scan_dataset(data), cfg, "cpu")
    with torch.no_grad():
        pipe.vae.encoder.conv_in.weight.mul_(1.01)  # another VAE: its latents must not be reused
    calls = _counting(pipe.vae, "encode")
    TrainingData(pipe, scan_dataset(data), cfg, "cpu")
    assert len(calls) == 1 and len(list((cache / "latents").glob("*"))) == 2


def _mixed_aspect_data(folder: Path) -> dict[str, tuple[int, int]]:
    """Six images of four aspect ratios (two square, two wide, a tall one, a 4:3 one); returns name -> (w, h)."""
    folder.mkdir()
    sizes = {"square": (64, 64), "wide": (160, 64), "tall": (64, 160), "photo": (120, 90), "square2": (96, 96),
             "wide2": (150, 70)}
    for k, (name, size) in enumerate(sizes.items()):
        pixels = torch.rand(size[1], size[0], 3, generator=torch.Generator().manual_seed(k)) * 255
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} image")
    return sizes


def test_mixed_aspect_ratios_train_in_single_shape_batches_with_matching_time_ids(bundled_model, tmp_path,
                                                                                    monkeypatch):
    sizes = _mixed_aspect_data(tmp_path / "data")
    seen = []

    def recording_loss(unet, scheduler, batch, *args, **kwargs):
        seen.append((batch.latents.clone(), batch.time_ids.clone()))
        return diffusion_loss(unet, scheduler, batch, *args, **kwargs)

    monkeypatch.setattr("pipelines.step.diffusion_loss", recording_loss)
    pipe = load_pipeline(bundled_model, device="cpu")
    train(TrainConfig(data=tmp_path / "data", output_dir=tmp_path / "run", batch_size=2, epochs=2, flip=True),
          pipe=pipe)

    assert len(seen) == 2 * 4  # per epoch: one batch each of 2 square, 2 wide, 1 tall, 1 photo (4:3) images
    assert len({tuple(latents.shape[2:]) for latents, _ in seen}) == 4  # four buckets, each its own batch shape
    paths = {(h, w): tmp_path / "data" / f"{name}.png" for name, (w, h) in sizes.items()}
    flips = set()
    for latents, time_ids in seen:
        assert (time_ids[:, 4:6] == torch.tensor(latents.shape[2:]) * 8).all()  # target size = the batch's shape
        for latent, ids in zip(latents, time_ids.int().tolist(), strict=True):
            original, (top, left), target = tuple(ids[0:2]), ids[2:4], tuple(ids[4:6])
            resized = center_view(original, target).resized
            # The time ids name the crop of the (maybe mirrored) resized image that the latent encodes.
            candidates = {False: View(original, resized, top, left, target),
                          True: View(original, resized, top, resized[1] - left - target[1], target, flip=True)}
            matches = [f for f, v in candidates.items() if torch.equal(encode_image(pipe, paths[original], v), latent)]
            assert matches, (original, ids)
            flips.update(matches)
    assert flips == {False, True}


def test_random_crops_slice_the_cached_latent_where_the_view_lies(bundled_model, tmp_path, monkeypatch):
    """With a local stand-in for the VAE (8x8 mean pooling), a slice of the region's latent must equal the
    encoding of the crop itself: this pins down the slicing arithmetic, flips included."""
    _mixed_aspect_data(tmp_path / "data")

    def pooled(pipe, path, view):  # (4, h/8, w/8): RGB means per 8x8 cell, and a zero channel
        pixels = F.avg_pool2d(load_view(path, view)[None], 8)[0]  # (3, h/8, w/8)
        return torch.cat([pixels, torch.zeros_like(pixels[:1])])

    monkeypatch.setattr("pipelines.training_data.encode_image", pooled)  # the cached path
    monkeypatch.setattr("pipelines.encoding.encode_image", pooled)  # the uncached path
    pipe = load_pipeline(bundled_model, device="cpu")
    dataset = scan_dataset(tmp_path / "data")
    cfg = TrainConfig(resolution=64, random_crop=True, flip=True, buckets=False)  # square crops: lots of slack
    cached = TrainingData(pipe, dataset, cfg, "cpu")
    uncached = TrainingData(pipe, dataset, replace(cfg, cache_latents=False), "cpu")
    rng = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(6):
        for index in epoch_batches(cached.buckets, 1, seed=0, epoch=0):
            views = cached.views(index, rng)
            offsets.add((views[0].top, views[0].left, views[0].flip))
            a, b = cached.batch(index, views).latents[:, :3], uncached.batch(index, views).latents[:, :3]
            assert torch.allclose(a, b, atol=1e-5), views
    assert len(offsets) > 10  # crops really moved, both flipped and not


def test_epoch_batches_group_by_bucket_and_cover_every_image():
    buckets = ["a", "b", "a", "a", "c", "b", "a"]
    for epoch in range(3):
        batches = epoch_batches(buckets, 2, seed=0, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(7))
        assert all(len({buckets[i] for i in b}) == 1 and len(b) <= 2 for b in batches)
        assert epoch_batches(buckets, 2, seed=0, epoch=epoch) == batches  # a function of (seed, epoch) alone
    assert epoch_batches(buckets, 2, 0, 0) != epoch_batches(buckets, 2, 0, 1)


def test_gradient_checkpointing_gives_the_same_training(bundled_model, demo_subset, tmp_path):
    data = demo_subset(2)

    def losses(checkpointing: bool) -> list[float]:
        events = []
        train(TrainConfig(data=data, output_dir=tmp_path / str(checkpointing), method="op-lora", max_steps=3, lr=1e-2,
                          gradient_checkpointing=checkpointing), on_event=events.append)
        return [e["loss"] for e in events]

    assert losses(True) == pytest.approx(losses(False), rel=1e-5)


def test_compiled_training_follows_the_eager_loss_curve(bundled_model, demo_subset, tmp_path):
    """`--compile` runs the training forward through torch.compile; `aot_eager` traces forward and backward like
    `inductor` does but skips code generation, so the test stays fast. Sampling afterwards stays eager."""
    from torch._dynamo.utils import counters

    data = demo_subset(2)

    def losses(backend: str | None) -> list[float]:
        events = []
        train(TrainConfig(data=data, output_dir=tmp_path / str(backend), method="op-lora", max_steps=3, lr=1e-2,
                          compile=backend), on_event=events.append)
        return [e["loss"] for e in events if "loss" in e]

    torch._dynamo.reset()
    counters.clear()
    compiled = losses("aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # the U-Net was captured, not silently run eagerly
    assert compiled == pytest.approx(losses(None), rel=1e-4)
    torch._dynamo.reset()


def test_fused_adamw_where_torch_has_it():

    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw([{"params": cpu}], 0.0).defaults["fused"] is True
    half = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]
    assert not adamw([{"params": half}], 0.0).defaults["fused"]  # float32 adapters only; others take the loop


def test_vae_override_replaces_the_base_vae(bundled_model, tmp_path):
    base = load_pipeline(bundled_model, device="cpu")
    with torch.no_grad():
        base.vae.decoder.conv_out.bias.add_(0.5)
    base.vae.save_pretrained(tmp_path / "my-vae")
    pipe = load_pipeline(bundled_model, dtype=torch.bfloat16, device="cpu", vae=tmp_path / "my-vae")
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.bfloat16
    assert torch.equal(pipe.vae.decoder.conv_out.bias, base.vae.decoder.conv_out.bias)
    original = load_pipeline(bundled_model, device="cpu").vae
    assert fingerprint(pipe.vae) == fingerprint(base.vae) != fingerprint(original)
    assert load_pipeline(bundled_model, device="cpu", vae=bundled_model).vae.decoder.conv_out.bias.abs().max() < 10
    with pytest.raises(ValueError, match="could not load a VAE from .*no-such-vae"):
        load_pipeline(bundled_model, device="cpu", vae=tmp_path / "no-such-vae")


def test_hub_id_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set.*hf download some-org/some-sdxl"):
        load_pipeline("some-org/some-sdxl")


def test_cli_boolean_flags(tmp_path):
    parse = build_parser().parse_args
    cfg = config_from_args(parse(["train", "--random-crop", "--flip", "--no-buckets", "--gradient-checkpointing"]))
    assert (cfg.random_crop, cfg.flip, cfg.buckets, cfg.gradient_checkpointing) == (True, True, False, True)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"random_crop": True, "cache_latents": False}))
    cfg = config_from_args(parse(["train", "--config", str(path), "--center-crop", "--cache-latents"]))
    assert (cfg.random_crop, cfg.cache_latents) == (False, True)
    assert TrainConfig().random_crop is False and TrainConfig().buckets is True
