"""What exported headers say: sd-scripts' training keys computed as sd-scripts computes them, and nothing that
locates the trainer's files (a shared LoRA must not carry its author's file system)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from safetensors.torch import save_file as write_safetensors

from pipelines.cli import main
from pipelines.config import TrainConfig
from pipelines.kohya import sshs_hashes
from pipelines.provenance import is_absolute, shipped_config
from pipelines.train import train

pytestmark = pytest.mark.usefixtures("single_thread")


def _header(file: Path) -> dict[str, str]:
    with safe_open(str(file), framework="pt") as f:
        return f.metadata()


def _data(bundled_data: Path, out: Path, n: int) -> Path:
    out.mkdir(parents=True)
    for image in sorted(bundled_data.glob("*.png"))[:n]:
        for file in (image, image.with_suffix(".txt")):
            shutil.copy(file, out / file.name)
    return out


def test_sshs_hashes_are_sd_scripts_precalculated_hashes():
    """sd-scripts `precalculate_safetensors_hashes`: the file serialized with its `ss_*` entries only; the model
    hash covers everything after the 8-byte length and the header, the legacy one 64 KiB at offset 1 MiB (so the
    tensors here exceed 1 MiB: a smaller file hashes nothing there)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(4, 200_000, generator=generator),
               "lora_unet_a.alpha": torch.tensor(4.0)}
    meta = {"ss_network_dim": "4", "ss_network_alpha": "4.0", "opdiff_method": "lora", "modelspec.title": "x"}
    data = io.BytesIO(save(tensors, {"ss_network_dim": "4", "ss_network_alpha": "4.0"}))
    length = int.from_bytes(data.read(8), "little")
    data.seek(8 + length)
    model_hash = hashlib.sha256(data.read()).hexdigest()
    data.seek(0x100000)
    legacy_hash = hashlib.sha256(data.read(0x10000)).hexdigest()[:8]
    assert sshs_hashes(tensors, meta) == {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    assert legacy_hash != hashlib.sha256(b"").hexdigest()[:8]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, bundled_data) -> Path:
    """A LoRA run of 2 epochs over 2 images (4 steps planned), stopped after its 3rd step, latents not cached."""
    root = tmp_path_factory.mktemp("stopped")
    done = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainConfig(data=_data(bundled_data, root / "data", 2), output_dir=root / "run", epochs=2,
                                 cache_latents=False, weight_decay=0.02),
                     on_event=lambda event: done.append(event["step"]), should_stop=lambda: len(done) >= 3)
    finally:
        torch.set_num_threads(threads)


def test_sd_scripts_keys_of_a_run_stopped_early(stopped_run):
    """As sd-scripts' train_network.py: ss_num_epochs = ceil(max_train_steps / batches per epoch), the planned
    number; ss_epoch = the epochs completed when the weights were saved within the run."""
    file = stopped_run / "lora-partial-step3_kohya.safetensors"  # a stopped run says so in its file names
    meta = _header(file)
    assert (meta["ss_steps"], meta["ss_max_train_steps"], meta["ss_num_batches_per_epoch"]) == ("3", "4", "2")
    assert (meta["ss_num_epochs"], meta["ss_epoch"]) == ("2", "1")
    assert meta["ss_cache_latents"] == "False" and meta["ss_gradient_checkpointing"] == "False"
    # train_util.get_optimizer: the class's module path and name, then its arguments.
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.02)"
    assert meta["ss_sd_model_name"] == "tiny-sdxl" and "ss_sd_model_hash" not in meta  # a folder is named only
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + length :]).hexdigest()
    ss_only = save(load_file(file), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000 : 0x110000]).hexdigest()[:8]


def test_a_finished_run_records_its_last_epoch(stopped_run, tmp_path):
    """Resumed to the end, the same run's file records the planned epochs as reached."""
    resumed = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    config = json.loads((resumed / "config.json").read_text())
    config["train"]["output_dir"] = str(resumed)  # the copy is the run now
    (resumed / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(resumed)]) == 0
    meta = _header(resumed / "lora_kohya.safetensors")
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_num_epochs"]) == ("4", "2", "2")


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, bundled_model, bundled_data) -> Path:
    """A DoRA run whose config holds every kind of absolute path: base, a separate VAE, data, run folder, disk
    cache, and a skipped file's reason; `opdiff eval` output naming a CLIP checkpoint by its path."""
    root = tmp_path_factory.mktemp("private")
    data = _data(bundled_data, root / "my-photos", 2)
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("a caption")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = train(TrainConfig(base=str(bundled_model.resolve()), vae=str((bundled_model / "vae").resolve()),
                                    data=data, output_dir=root / "run", cache_dir=root / "cache", method="dora",
                                    max_steps=2))
    finally:
        torch.set_num_threads(threads)
    (run_dir / "cmmd.json").write_text(json.dumps({"cmmd": 1.0, "clip_checkpoint": str(root / "clip.safetensors")}))
    return run_dir


def _absolute_strings(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*map(_absolute_strings, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_absolute_strings, value)) if value else set()
    return {value} if isinstance(value, str) and is_absolute(value) else set()


def test_no_exported_file_holds_an_absolute_path_of_the_run(dora_run, tmp_path):
    config = json.loads((dora_run / "config.json").read_text())
    private = _absolute_strings(config) | {str(dora_run), str(dora_run.parent), str(Path.home())}
    assert {"base", "vae", "data", "output_dir", "cache_dir"} <= {k for k, v in config["train"].items()
                                                                  if isinstance(v, str) and is_absolute(v)}
    assert any(s["file"] == "broken.png" for s in config["dataset"]["skipped"])
    # Every way to export: training's own files, the CLI in half precision elsewhere, one kind by name.
    assert main(["export", str(dora_run), "--dtype", "fp16", "--out", str(tmp_path / "shared.safetensors")]) == 0
    assert main(["export", str(dora_run), "--format", "comfyui", "--out", str(tmp_path / "c.safetensors")]) == 0
    files = sorted(dora_run.glob("lora*.safetensors")) + sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 4 + 4 + 1
    for file in files:
        for key, value in _header(file).items():
            leaked = [p for p in private if p in value]
            assert not leaked, f"{file.name}: header {key} holds {leaked[0]}"
            assert "/tmp/" not in value and not is_absolute(value), f"{file.name}: header {key}: {value[:80]}"
    meta = _header(dora_run / "lora_lycoris.safetensors")
    shipped = json.loads(meta["opdiff_config"])
    assert shipped["train"]["data"] == "my-photos" and shipped["dataset"]["root"] == "my-photos"
    assert shipped["base"] == shipped["train"]["base"] == meta["opdiff_base"] == meta["ss_sd_model_name"] == "tiny-sdxl"
    assert shipped["train"]["vae"] == meta["ss_vae_name"] == "vae"
    cmmd = json.loads(_header(tmp_path / "shared_lycoris.safetensors")["opdiff_cmmd"])  # eval ran after training
    assert cmmd == {"cmmd": 1.0, "clip_checkpoint": "clip.safetensors"}


def test_a_single_file_base_is_named_by_file_name_and_hash(tmp_path):
    """A local file is named with its hashes, as sd-scripts records its base (`ss_new_sd_model_hash`, the SHA-256
    AUTOMATIC1111 shows for a checkpoint; `ss_sd_model_hash`, its old 8-digit hash), never by its path."""
    base = tmp_path / "private" / "my-finetune.safetensors"
    base.parent.mkdir()
    write_safetensors({"x": torch.arange(400_000, dtype=torch.float32)}, base)
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    config = {"base": str(base), "train": {"base": str(base), "data": str(tmp_path / "d"), "vae": None},
              "dataset": {"path": str(tmp_path / "d"), "root": str(tmp_path / "d"), "skipped": []}}
    shipped = shipped_config(config)
    assert shipped["base"] == shipped["train"]["base"] == "my-finetune.safetensors" and shipped["train"]["data"] == "d"
    from pipelines.kohya import _model_entries

    assert _model_entries("sd_model", str(base)) == {
        "ss_sd_model_name": "my-finetune.safetensors", "ss_new_sd_model_hash": digest,
        "ss_sd_model_hash": hashlib.sha256(base.read_bytes()[0x100000:0x110000]).hexdigest()[:8]}
    assert _model_entries("sd_model", "stabilityai/stable-diffusion-xl-base-1.0") == {
        "ss_sd_model_name": "stabilityai/stable-diffusion-xl-base-1.0"}
