"""Dataset reading: captions from .txt files or metadata.jsonl, bad files reported by name and skipped."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.config import TrainConfig
from pipelines.data import load_image, scan_dataset
from pipelines.train import train


def _image(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", color: int = 90) -> Path:
    Image.new(mode, size, color if mode in ("L", "P") else (color, 20, 200, 255)[: len(mode)]).save(path)
    return path


def _captioned(folder: Path, name: str, caption: str, **kw) -> Path:
    path = _image(folder / name, **kw)
    path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def test_folder_with_txt_captions(tmp_path):
    _captioned(tmp_path, "a.png", "a red square")
    _captioned(tmp_path, "b.jpg", "a blue circle", size=(64, 64))
    _captioned(tmp_path, "c.webp", "a green star", mode="RGBA")
    (tmp_path / "notes.md").write_text("not part of the dataset")
    ds = scan_dataset(tmp_path)
    assert [(e.path.name, e.caption) for e in ds.examples] == [
        ("a.png", "a red square"),
        ("b.jpg", "a blue circle"),
        ("c.webp", "a green star"),
    ]
    assert ds.skipped == []
    assert len(ds.hash) == 64


def test_hash_follows_content_and_captions(tmp_path):
    _captioned(tmp_path, "a.png", "a red square")
    first = scan_dataset(tmp_path).hash
    assert scan_dataset(tmp_path).hash == first
    (tmp_path / "a.txt").write_text("a red square, opdiff style")
    assert scan_dataset(tmp_path).hash != first


def test_metadata_jsonl(tmp_path):
    _image(tmp_path / "x.png")
    _image(tmp_path / "y.jpeg")
    _image(tmp_path / "unlisted.png")
    (tmp_path / "x.txt").write_text("ignored: metadata.jsonl wins")
    rows = [
        {"file_name": "x.png", "text": "first"},
        {"file_name": "y.jpeg", "text": "second"},
        {"file_name": "gone.png", "text": "missing file"},
        {"file_name": "x.png"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\nnot json\n")
    ds = scan_dataset(tmp_path)
    assert [(e.path.name, e.caption) for e in ds.examples] == [("x.png", "first"), ("y.jpeg", "second")]
    reasons = dict(ds.skipped)
    assert "not found" in reasons["gone.png"]
    assert "file_name and text" in reasons["metadata.jsonl line 4"]
    assert "file_name and text" in reasons["metadata.jsonl line 6"]


def test_bad_files_are_reported_by_name_and_skipped(tmp_path, caplog):
    _captioned(tmp_path, "good.png", "fine")
    good_bytes = (tmp_path / "good.png").read_bytes()
    bad = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "empty.png": b"",
        "text.jpg": b"this is a text file, not a JPEG",
        "truncated.png": good_bytes[: len(good_bytes) // 2],
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).with_suffix(".txt").write_text("caption")
    _image(tmp_path / "uncaptioned.png")
    with caplog.at_level(logging.WARNING, logger="pipelines.data"):
        ds = scan_dataset(tmp_path)
    assert [e.path.name for e in ds.examples] == ["good.png"]
    reasons = dict(ds.skipped)
    assert set(reasons) == {*bad, "uncaptioned.png"}
    assert "0 bytes" in reasons["empty.png"]
    assert "not a readable image" in reasons["corrupt.png"]
    assert "not a readable image" in reasons["text.jpg"]
    assert "not a readable image" in reasons["truncated.png"]
    assert "no caption file uncaptioned.txt" in reasons["uncaptioned.png"]
    for name in reasons:
        assert name in caplog.text


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"has no usable images \(no .png/.jpg/.jpeg/.webp files found\)"):
        scan_dataset(tmp_path)


def test_only_bad_files_is_a_clear_error_naming_them(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"")
    (tmp_path / "broken.txt").write_text("caption")
    with pytest.raises(ValueError, match=r"no usable images \(broken.png: empty file"):
        scan_dataset(tmp_path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor a .zip"):
        scan_dataset(tmp_path / "nowhere")


def test_empty_dataset_fails_before_the_model_loads(tmp_path):
    cfg = TrainConfig(base=str(tmp_path / "no-such-model"), data=tmp_path, output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="no usable images"):  # not the model's "could not load" error
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_zip_of_a_folder(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    _captioned(folder, "a.png", "one")
    _captioned(folder, "b.png", "two")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in folder.iterdir():
            z.write(p, f"set/{p.name}")
    ds = scan_dataset(archive)
    assert [(e.path.name, e.caption) for e in ds.examples] == [("a.png", "one"), ("b.png", "two")]
    assert ds.hash == scan_dataset(folder).hash


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_load_image_resizes_shorter_side_and_center_crops(tmp_path, mode):
    path = _image(tmp_path / "wide.png" if mode != "CMYK" else tmp_path / "wide.jpg", size=(100, 50), mode=mode)
    pixels, original, crop = load_image(path, 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    assert original == (50, 100)  # (height, width) before resizing
    assert crop == (0, 16)  # 100x50 -> 64x32, then 16 px cut on the left and right


def test_load_image_maps_pixel_values_to_minus_one_one(tmp_path):
    path = tmp_path / "bw.png"
    im = Image.new("RGB", (16, 16), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 16, 8))
    im.save(path)
    pixels, _, _ = load_image(path, 16)
    assert torch.equal(pixels[:, :8], torch.ones(3, 8, 16))
    assert torch.equal(pixels[:, 8:], -torch.ones(3, 8, 16))
