"""Paper recipes: dataset schemas (Naruto BLIP, WikiArt), filters, caption templates, and `reproduce` end to end."""

from __future__ import annotations

import csv
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from pipelines.evaluate import DEMO_CLIP, ClipOptions
from pipelines.hf_data import HFSource, is_hf_source, materialize
from pipelines.reproduce import ReproduceConfig, load_recipe, reproduce

GENRES = ["abstract_painting", "cityscape", "genre_painting", "illustration", "landscape", "nude_painting",
          "portrait", "religious_painting", "sketch_and_study", "still_life", "Unknown Genre"]
ARTISTS = ["Unknown Artist", "boris-kustodiev", "camille-pissarro", "childe-hassam", "claude-monet", "edgar-degas"]


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def naruto_parquet(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": images(3), "text": ["a man with a hoodie", "a girl with pink hair ", "a fox"]}, features=features)
    path = tmp_path / "naruto" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    ds.to_parquet(str(path))
    return path


@pytest.fixture
def wikiart_parquet(tmp_path):
    """WikiArt's schema: integer-coded artist, genre and style with their label names."""
    features = datasets.Features({
        "image": datasets.Image(),
        "artist": datasets.ClassLabel(names=ARTISTS),
        "genre": datasets.ClassLabel(names=GENRES),
        "style": datasets.ClassLabel(names=["Impressionism", "Realism"]),
    })
    artists = [4, 1, 4, 5, 4, 0]
    genres = [9, 4, 4, 6, 6, 10]
    ds = datasets.Dataset.from_dict(
        {"image": images(6), "artist": artists, "genre": genres, "style": [0, 1, 0, 0, 0, 1]}, features=features)
    path = tmp_path / "wikiart.parquet"
    ds.to_parquet(str(path))
    return path


def read_metadata(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_naruto_recipe_keeps_blip_captions(naruto_parquet, tmp_path):
    source, train, methods = load_recipe("naruto")
    assert methods == ["lora", "op-lora", "dora", "op-dora"]  # op-lora.txt Table 1
    assert train["rank"] == 4 and train["alpha"] == 4.0 and train["op_width"] == 32 and train["lr"] == 1e-4
    assert train["epochs"] == 2 and train["batch_size"] == 1 and train["resolution"] == 1024
    folder = materialize(HFSource(**{**source.__dict__, "source": str(naruto_parquet.parent)}), tmp_path / "cache")
    rows = read_metadata(folder)
    assert [r["text"] for r in rows] == ["a man with a hoodie", "a girl with pink hair", "a fox"]
    assert all(Image.open(folder / r["file_name"]).size == (48, 40) for r in rows)


def test_monet_recipe_filters_by_artist_name_and_captions_by_genre(wikiart_parquet, tmp_path):
    source, _, _ = load_recipe("monet")
    assert source.source == "hf:huggan/wikiart" and source.filter == (("artist", "claude-monet"),)
    folder = materialize(HFSource(**{**source.__dict__, "source": str(wikiart_parquet)}), tmp_path / "cache")
    captions = [r["text"] for r in read_metadata(folder)]
    assert captions == ["A painting of genre still life", "A painting of genre landscape",
                        "A painting of genre portrait"]
    assert not any("monet" in c.lower() for c in captions)
    # A second call reuses the finished folder.
    (folder / "000000.png").unlink()
    assert materialize(HFSource(**{**source.__dict__, "source": str(wikiart_parquet)}), tmp_path / "cache") == folder


def test_bad_sources_are_named(wikiart_parquet, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RuntimeError, match="cannot read dataset 'hf:nobody/nothing'.*offline"):
        materialize(HFSource("hf:nobody/nothing"), tmp_path / "cache")
    with pytest.raises(ValueError, match="filter column 'painter' is not in the dataset"):
        materialize(HFSource(str(wikiart_parquet), caption_column=None, caption_template="{genre}",
                             filter=(("painter", "x"),)), tmp_path / "cache")
    with pytest.raises(ValueError, match="no rows of .* pass the filter"):
        materialize(HFSource(str(wikiart_parquet), caption_column=None, caption_template="{genre}",
                             filter=(("artist", "nobody"),)), tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown recipe 'naruto2'"):
        load_recipe("naruto2")
    assert is_hf_source("hf:x/y") and is_hf_source(wikiart_parquet) and not is_hf_source(tmp_path)


def test_reproduce_end_to_end_on_the_bundled_model(demo_subset, bundled_model, tmp_path, single_thread):
    data = demo_subset(3)
    overrides = {"base": str(bundled_model), "resolution": None, "mixed_precision": "no", "max_steps": 2,
                 "lr": 1e-3, "device": "cpu", "sample_steps": 2}
    cfg = ReproduceConfig("naruto", tmp_path / "repro", methods=("lora", "op-lora"), data=str(data),
                          set=tuple(f"{k}={json.dumps(v)}" for k, v in overrides.items()), eval_steps=2,
                          clip=ClipOptions(clip_model=DEMO_CLIP))
    table = reproduce(cfg)
    text = table.read_text()
    assert "note: the bundled demo CLIP" in text and "CMMD variant" in text
    with open(tmp_path / "repro" / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["lora", "op-lora"]
    assert all(np.isfinite(float(r["cmmd"])) and int(r["n_images"]) == 3 and r["steps"] == "2" for r in rows)
    assert (tmp_path / "repro" / "samples.png").exists()
    # Resumable: a second call reuses the runs and scores.
    stamp = (tmp_path / "repro" / "lora" / "lora.safetensors").stat().st_mtime_ns
    reproduce(cfg)
    assert (tmp_path / "repro" / "lora" / "lora.safetensors").stat().st_mtime_ns == stamp


def test_cli_reproduce_rejects_bad_overrides(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["reproduce", "--recipe", "naruto", "--output-dir", str(tmp_path), "--set", "rank"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err
    assert main(["reproduce", "--recipe", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
