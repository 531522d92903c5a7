"""Dataset reading: captions from .txt files or metadata.jsonl, bad files reported by name and skipped;
aspect-ratio buckets and training views (crop, flip, SDXL's time ids)."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import TrainConfig
from pipelines.data import (
    SDXL_BUCKETS,
    View,
    bucket_sizes,
    center_view,
    crop_region,
    load_view,
    nearest_bucket,
    scan_dataset,
)
from pipelines.train import train


def _image(path: Path, size: tuple[int, int] = (48, 40), mode: str = "RGB", color: int = 90) -> Path:
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
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    ds = scan_dataset(tmp_path)
    assert [(e.path.name, e.caption) for e in ds.examples] == [
        ("a.png", "a red square"),
        ("b.jpg", "a blue circle"),
        ("c.webp", "a green star"),
    ]
    assert [e.size for e in ds.examples] == [(40, 48), (64, 64), (40, 48)]  # (height, width)
    assert ds.skipped == [("notes.md", "not an image file (only .png, .jpg, .jpeg, .webp are read)")]
    assert ds.converted == []  # the opaque RGBA image is stored as RGB by the WebP encoder
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
    assert reasons["unlisted.png"] == "not listed in metadata.jsonl"


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
    assert "no caption file uncaptioned.txt (set a fallback caption" in reasons["uncaptioned.png"]
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
    ds = scan_dataset(archive, extract_to=tmp_path / "unzipped")
    assert [(e.path.name, e.caption) for e in ds.examples] == [("a.png", "one"), ("b.png", "two")]
    assert ds.root == tmp_path / "unzipped" / "set"  # the zip's single folder is the dataset
    assert ds.hash == scan_dataset(folder).hash
    again = scan_dataset(archive, extract_to=tmp_path / "unzipped")  # same archive: the extraction is reused
    assert again.hash == ds.hash
    temporary = scan_dataset(archive)  # no folder given: a temporary one the caller removes
    assert temporary.root.parent.name.startswith("opdiff-data-") and temporary.hash == ds.hash


def test_zip_does_not_overwrite_a_foreign_folder(tmp_path):
    _captioned(tmp_path, "a.png", "one")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(tmp_path / "a.png", "a.png")
        z.write(tmp_path / "a.txt", "a.txt")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="exists and was not made by opdiff"):
        scan_dataset(archive, extract_to=tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"


def test_bucket_sizes_at_1024_are_sdxl_sizes():
    sizes = bucket_sizes(1024)
    assert sizes == [(h, w) for w, h in SDXL_BUCKETS]
    assert (1024, 1024) == sizes[0] and (896, 1152) in sizes and (640, 1536) in sizes and (1536, 640) in sizes
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in sizes)


@pytest.mark.parametrize(("resolution", "quantum"), [(512, 32), (768, 48), (256, 16), (64, 8)])
def test_scaled_buckets_keep_area_ratio_and_grid(resolution, quantum):
    sizes = bucket_sizes(resolution)
    assert sizes[0] == (resolution, resolution)
    for h, w in sizes:
        assert h % quantum == 0 and w % quantum == 0
        assert (w, h) in sizes  # every landscape bucket has its portrait twin
        assert abs(h * w / resolution**2 - 1) < 0.25
    assert max(w / h for h, w in sizes) > 2  # the 1536x640 end of the range survives scaling


@pytest.mark.parametrize(
    ("size", "bucket"),
    [((1000, 1000), (1024, 1024)), ((1080, 1920), (768, 1344)), ((1920, 1080), (1344, 768)),
     ((3000, 1000), (1536, 640)), ((600, 800), (896, 1152)), ((30, 4000), (640, 1536))],
)
def test_nearest_bucket_by_aspect_ratio(size, bucket):
    assert nearest_bucket(size, bucket_sizes(1024)) == bucket


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_center_view_resizes_to_cover_and_crops_the_middle(tmp_path, mode):
    path = _image(tmp_path / "wide.png" if mode != "CMYK" else tmp_path / "wide.jpg", size=(100, 50), mode=mode)
    view = center_view((50, 100), (32, 32))
    assert view.resized == (32, 64) and (view.top, view.left) == (0, 16)  # 100x50 -> 64x32, 16 px off each side
    assert view.time_ids() == [50, 100, 0, 16, 32, 32]
    pixels = load_view(path, view)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0


def test_flipped_view_is_the_crop_of_the_flipped_image_its_time_ids_name(tmp_path):
    path = tmp_path / "ramp.png"
    Image.fromarray((torch.arange(64).repeat(32, 1) * 4).to(torch.uint8).numpy()).convert("RGB").save(path)
    view = View(original=(32, 64), resized=(32, 64), top=0, left=8, size=(32, 32), flip=True)
    top, left = view.time_ids()[2:4]
    assert (top, left) == (0, 24)  # 64 - 8 - 32: the crop seen from the mirrored image's left edge
    mirrored = Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((left, top, left + 32, top + 32))
    expected = torch.from_numpy(np.asarray(mirrored, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(load_view(path, view), expected)
    assert torch.equal(load_view(path, View((32, 64), (32, 64), 0, 8, (32, 32))), expected.flip(-1))


def test_crop_region_holds_every_grid_aligned_crop():
    region = crop_region((300, 1000), (64, 128), step=8)
    assert region.resized == (64, 213)  # 1000 x 300 scaled by 64 / 300: the height fits exactly
    assert region.size == (64, 128 + 80)  # 85 px of slack, 80 of it on the 8-px grid
    assert (region.top, region.left) == (0, 2)  # the 5 px left over are split around the region
    assert region.left + region.size[1] <= 213


def test_load_view_maps_pixel_values_to_minus_one_one(tmp_path):
    path = tmp_path / "bw.png"
    im = Image.new("RGB", (16, 16), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 16, 8))
    im.save(path)
    pixels = load_view(path, center_view((16, 16), (16, 16)))
    assert torch.equal(pixels[:, :8], torch.ones(3, 8, 16))
    assert torch.equal(pixels[:, 8:], -torch.ones(3, 8, 16))
