"""`opdiff cmmd` and `opdiff eval`: CMMD of two folders, and a run scored by op-lora.txt Sec. 4.1.

CLIP here is the bundled demo CLIP (`--clip-model demo`) on the command line, and the tests' tiny random-weight CLIP
(the `random_clip` fixture) in Python: the numbers mean little, but every step of the protocol (generation, file
layout, embedding, CMMD, labels) runs for real.
"""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metrics import ClipEmbedder
from pipelines.cli import main
from pipelines.config import TrainConfig
from pipelines.data import scan_dataset
from pipelines.evaluate import (
    DEMO_CLIP,
    ClipOptions,
    EvalConfig,
    cmmd_dirs,
    evaluate_run,
    generate_for_captions,
    load_embedder,
    trust_label,
)
from pipelines.model import load_pipeline
from pipelines.rundir import RunDir
from pipelines.train import train

pytestmark = pytest.mark.usefixtures("single_thread", "shared_pipeline")

N_IMAGES = 4
TINY = ["--clip-model", DEMO_CLIP]
DEMO_NOTE = "note: the bundled demo CLIP"
CMMD_FILE = RunDir.CMMD


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, bundled_data: Path) -> Path:
    """A finished run: LoRA trained for 2 steps on the first 4 bundled images (large lr, so the adapter shows)."""
    data = tmp_path_factory.mktemp("data")
    for image in sorted(bundled_data.glob("*.png"))[:N_IMAGES]:
        shutil.copy(image, data / image.name)
        shutil.copy(image.with_suffix(".txt"), data / image.with_suffix(".txt").name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainConfig(data=data, output_dir=tmp_path_factory.mktemp("run"), max_steps=2, lr=1e-2))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, bundled_data: Path) -> tuple[Path, Path]:
    """Two folders of 5 bundled images each, no image in both."""
    images = sorted(bundled_data.glob("*.png"))
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    for image in images[:5]:
        shutil.copy(image, a / image.name)
    for image in images[-5:]:
        shutil.copy(image, b / image.name)
    return a, b


def _printed_cmmd(out: str) -> float:
    match = re.search(r"^CMMD: (\S+)", out, re.MULTILINE)
    assert match, f"no CMMD line in {out!r}"
    return float(match.group(1))


# --- opdiff eval ------------------------------------------------------------------------------------------------


def test_eval_writes_cmmd_json_and_one_image_per_caption(run_dir, capsys):
    assert main(["eval", str(run_dir), *TINY, "--steps", "2", "--base-too"]) == 0
    out = capsys.readouterr().out
    assert DEMO_NOTE in out

    result = json.loads((run_dir / CMMD_FILE).read_text())
    assert result["cmmd"] == pytest.approx(_printed_cmmd(out), abs=1e-4)
    assert {k: result[k] for k in ("n_images", "n_reference", "trustworthy", "steps", "seed")} == {
        "n_images": N_IMAGES, "n_reference": N_IMAGES, "trustworthy": True, "steps": 2, "seed": 0
    }
    assert result["clip_model"] == load_embedder(ClipOptions(clip_model=DEMO_CLIP)).model_name
    assert math.isfinite(result["cmmd"]) and math.isfinite(result["base_cmmd"])

    data = json.loads((run_dir / "config.json").read_text())["dataset"]["path"]
    captions = [ex.caption for ex in scan_dataset(data).examples]
    for folder in ("images", "base-images"):
        images = sorted((run_dir / "eval" / folder).glob("*.png"))
        assert len(images) == len(captions)
        assert [p.with_suffix(".txt").read_text() for p in images] == captions
        assert all(Image.open(p).size == (64, 64) for p in images)  # the run's training resolution
    # Same caption, same seed: only the LoRA differs, so a difference shows the run's LoRA was loaded.
    adapted = np.asarray(Image.open(run_dir / "eval" / "images" / "00000.png"), dtype=np.float32)
    base = np.asarray(Image.open(run_dir / "eval" / "base-images" / "00000.png"), dtype=np.float32)
    assert np.abs(adapted - base).max() > 1


def test_evaluate_run_limit_replaces_earlier_images(run_dir, random_clip):
    images = run_dir / "eval" / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(images / "stale.png")

    result = evaluate_run(EvalConfig(run_dir, steps=1, seed=3, limit=2, guidance_scale=1.0), random_clip)
    assert result == json.loads((run_dir / CMMD_FILE).read_text())
    assert (result["n_images"], result["n_reference"], result["seed"], result["guidance_scale"]) == (2, N_IMAGES, 3, 1.0)
    assert "base_cmmd" not in result
    assert sorted(p.name for p in images.glob("*.png")) == ["00000.png", "00001.png"]


def test_caption_i_is_generated_from_seed_plus_i(bundled_model, tmp_path):
    pipe = load_pipeline(bundled_model)
    settings = {"size": 64, "steps": 2, "guidance_scale": 1.0}
    both = generate_for_captions(pipe, ["a cat", "a dog"], tmp_path / "both", seed=10, **settings)
    second = generate_for_captions(pipe, ["a dog"], tmp_path / "second", seed=11, **settings)
    np.testing.assert_array_equal(np.asarray(Image.open(both[1])), np.asarray(Image.open(second[0])))
    assert not np.array_equal(np.asarray(Image.open(both[0])), np.asarray(Image.open(both[1])))


# --- opdiff cmmd ------------------------------------------------------------------------------------------------


def test_cmmd_of_a_folder_with_itself_is_zero(folders, capsys, random_clip):
    a, _ = folders
    assert main(["cmmd", str(a), str(a), *TINY]) == 0
    out = capsys.readouterr().out
    assert _printed_cmmd(out) == 0
    assert DEMO_NOTE in out
    assert cmmd_dirs(a, a, random_clip) == 0


def test_cmmd_of_different_folders_is_positive_and_symmetric(folders, tmp_path, capsys, random_clip):
    a, b = folders
    assert main(["cmmd", str(a), str(b), *TINY, "--cache-dir", str(tmp_path / "cache")]) == 0
    ab = capsys.readouterr().out
    assert main(["cmmd", str(b), str(a), *TINY]) == 0
    ba = capsys.readouterr().out
    assert _printed_cmmd(ab) > 0
    assert _printed_cmmd(ab) == _printed_cmmd(ba)
    assert "5 images in" in ab
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # one embedding file per folder

    assert cmmd_dirs(a, b, random_clip) == pytest.approx(cmmd_dirs(b, a, random_clip), rel=1e-12)


def test_cmmd_of_too_few_images_warns_with_the_reason(bundled_data, tmp_path, capsys):
    images = sorted(bundled_data.glob("*.png"))
    sets = {}
    for name, chosen in (("one-a", images[:1]), ("one-b", images[-1:]), ("ten-a", images[:10]),
                         ("ten-b", images[-10:])):
        sets[name] = tmp_path / name
        sets[name].mkdir()
        for image in chosen:
            shutil.copy(image, sets[name])
    assert main(["cmmd", str(sets["one-a"]), str(sets["one-b"]), *TINY]) == 0
    out = capsys.readouterr().out
    assert _printed_cmmd(out) > 0
    assert ("warning: CMMD from 1 image(s) in a set means little: each set's average includes its images compared "
            "with themselves (1/1 of it here), so below 10 images per set the score reflects the sample size") in out
    assert main(["cmmd", str(sets["ten-a"]), str(sets["ten-b"]), *TINY]) == 0
    assert "warning:" not in capsys.readouterr().out


# --- no weights, wrong inputs, labels ---------------------------------------------------------------------------


def test_cmmd_without_clip_weights_stops_with_how_to(folders, empty_caches, capsys):
    a, b = folders
    assert main(["cmmd", str(a), str(b)]) == 2
    captured = capsys.readouterr()
    assert "never falls back to random features" in captured.err
    assert "--clip-checkpoint PATH" in captured.err
    assert "CMMD:" not in captured.out


def test_eval_without_clip_weights_generates_and_writes_nothing(run_dir, empty_caches, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval", CMMD_FILE))
    assert main(["eval", str(run), "--steps", "1"]) == 2
    assert "never falls back to random features" in capsys.readouterr().err
    assert not (run / CMMD_FILE).exists()
    assert not (run / "eval").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cmmd", "{missing}", "{a}", *TINY], "not a folder"),
        (["cmmd", "{a}", "{empty}", *TINY], "no images"),
        (["cmmd", "{a}", "{a}", *TINY, "--clip-checkpoint", "x.safetensors"], "takes no --clip-checkpoint"),
        (["eval", "{empty}", *TINY], "not a finished run folder: config.json is missing"),
        (["eval", "{run}", *TINY, "--limit", "0"], "limit must be >= 1"),
    ],
)
def test_cli_errors_exit_2_with_the_reason(argv, message, folders, run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "a": folders[0], "run": run_dir}
    assert main([arg.format(**paths) for arg in argv]) == 2
    assert message in capsys.readouterr().err


def test_trust_labels(random_clip):
    assert trust_label(random_clip).startswith("UNTRUSTWORTHY: random CLIP weights")
    assert trust_label(load_embedder(ClipOptions(clip_model=DEMO_CLIP))).startswith(DEMO_NOTE)
    other = ClipEmbedder(torch.nn.Identity(), "ViT-B-32-quickgelu", "file", 224, torch.device("cpu"))
    assert "not the reference ViT-L-14-336-quickgelu" in trust_label(other)
    reference = ClipEmbedder(torch.nn.Identity(), "ViT-L-14-336-quickgelu", "file", 336, torch.device("cpu"))
    assert trust_label(reference) == ""
