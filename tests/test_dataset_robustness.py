"""Datasets as users have them: broken and odd images, stray files, hostile zips, missing captions.

Bad files are reported by name with the reason and skipped; odd but valid images are converted; training runs
on what is usable. A zip is refused before anything is written when a member could land outside its folder,
and when it would unpack to far more than it weighs (a zip bomb, of one member or of many small ones); only its
images and captions are extracted. Links out of a dataset folder are not followed, however the file is listed.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import TrainConfig
from pipelines.data import extract_zip, open_rgb, scan_dataset
from pipelines.rundir import RunDir
from pipelines.train import train

pytestmark = pytest.mark.usefixtures("single_thread", "shared_pipeline")

BUNDLED_DATA = Path(__file__).resolve().parent.parent / "assets" / "demo-data"


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` but holds almost no data, as a decompression bomb starts."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _save(image: Image.Image, path: Path, caption: str = "a test image", **kw) -> Path:
    image.save(path, **kw)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


@pytest.fixture
def messy_folder(tmp_path, bundled_data) -> Path:
    """Two good demo images, three odd but valid ones, and every kind of bad file, each with a caption."""
    folder = tmp_path / "messy"
    folder.mkdir()
    for image in sorted(bundled_data.glob("*.png"))[:2]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    _save(Image.new("RGB", (96, 64), (200, 30, 30)).convert("CMYK"), folder / "cmyk.jpg", quality=95)
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.paste(0, (0, 0, 32, 64))
    _save(palette, folder / "palette.png", transparency=0)  # left half transparent
    _save(Image.fromarray(np.full((48, 64), 32896, dtype=np.uint16)), folder / "grey16.png")  # 16-bit mid grey
    good = (folder / "palette.png").read_bytes()
    bad = {
        "empty.png": b"",
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "fake.jpg": b"this is a text file with an image extension",
        "truncated.png": good[: len(good) // 2],
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text("caption", encoding="utf-8")
    _save(Image.new("RGB", (1, 1)), folder / "dot.png")
    _save(Image.new("RGB", (300, 20)), folder / "sliver.png")
    _png_header_only(folder / "huge.png", 12_000, 12_000).with_suffix(".txt").write_text("x")  # over our limit
    _png_header_only(folder / "bomb.png", 50_000, 50_000).with_suffix(".txt").write_text("x")  # over PIL's too
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    return folder


SKIPPED = {
    "empty.png": "empty file (0 bytes)",
    "corrupt.png": "not a readable image",
    "fake.jpg": "not a readable image",
    "truncated.png": "not a readable image",
    "dot.png": "too small: 1x1 pixels",
    "sliver.png": "too small: 300x20 pixels",
    "huge.png": "image too large: 12000x12000",
    "bomb.png": "image too large",
    "notes.pdf": "not an image file",
}


def test_bad_files_are_named_odd_ones_converted_and_training_uses_the_rest(messy_folder, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipelines"):
        run_dir = train(TrainConfig(data=messy_folder, output_dir=tmp_path / "run", max_steps=2, batch_size=2))

    dataset = json.loads((run_dir / "config.json").read_text())["dataset"]
    skipped = {row["file"]: row["reason"] for row in dataset["skipped"]}
    assert set(skipped) == set(SKIPPED)
    for name, reason in SKIPPED.items():
        assert reason in skipped[name], name
        assert f"skipping {name}: {reason}" in caplog.text  # the log names each file and why
    converted = {row["file"]: row["note"] for row in dataset["converted"]}
    assert converted == {
        "cmyk.jpg": "converted from CMYK",
        "palette.png": "P with transparency composited over white",
        "grey16.png": "I;16 grey converted to 8-bit RGB",
    }
    assert dataset["images"] == 5
    losses = (run_dir / "losses.csv").read_text().splitlines()[1:]
    assert len(losses) == 2 and (run_dir / "lora.safetensors").is_file()


def test_odd_images_convert_to_what_they_show(messy_folder):
    grey, note = open_rgb(messy_folder / "grey16.png")
    assert note and np.asarray(grey)[0, 0].tolist() == [128, 128, 128]  # 32896 / 257: mid grey, not clipped white
    palette, _ = open_rgb(messy_folder / "palette.png")
    assert np.asarray(palette)[10, 10].tolist() == [255, 255, 255]  # transparent: white, not the hidden black
    assert np.asarray(palette)[10, 50].tolist() == [10, 200, 10]
    cmyk, _ = open_rgb(messy_folder / "cmyk.jpg")
    assert np.abs(np.asarray(cmyk, dtype=int)[32, 48] - [200, 30, 30]).max() < 12


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _save(image, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    dataset = scan_dataset(tmp_path)
    assert dataset.examples[0].size == (80, 40)  # (height, width) as displayed: portrait
    upright, _ = open_rgb(tmp_path / "phone.jpg")
    assert upright.size == (40, 80) and np.asarray(upright)[5, 20, 0] > 200  # red on top after rotating


def test_fallback_caption_for_uncaptioned_images(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    _save(Image.new("RGB", (64, 64)), tmp_path / "b.png", caption="own caption")
    assert [e.caption for e in scan_dataset(tmp_path, caption="a photo of sks").examples] == [
        "a photo of sks", "own caption"]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{"file_name": "b.png", "text": "listed"}\n')
    assert [e.caption for e in scan_dataset(tmp_path, caption="fallback").examples] == ["fallback", "listed"]


@pytest.mark.parametrize("listing", ["folder", "metadata.jsonl"])
def test_symbolic_links_out_of_the_dataset_are_not_followed(listing, tmp_path):
    """One policy for both kinds of dataset: a link to a file outside the folder is skipped with the same reason;
    a link that stays inside is an ordinary file."""
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "elsewhere" / "secret.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "data" / "ok.png")
    (tmp_path / "data" / "out.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    (tmp_path / "data" / "in.png").symlink_to(tmp_path / "data" / "ok.png")
    if listing == "folder":
        for name in ("ok", "out", "in"):
            (tmp_path / "data" / f"{name}.txt").write_text(f"{name} caption")
    else:
        rows = [{"file_name": f"{name}.png", "text": f"{name} caption"} for name in ("ok", "out", "in")]
        (tmp_path / "data" / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    dataset = scan_dataset(tmp_path / "data")
    assert sorted(e.path.name for e in dataset.examples) == ["in.png", "ok.png"]
    reason = dict(dataset.skipped)["out.png"]
    assert f"leads outside the dataset folder (to {tmp_path / 'elsewhere' / 'secret.png'}); links out of a dataset " \
           "are not followed" in reason


def test_a_caption_linked_from_outside_is_not_read(tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "data" / "a.png")
    (tmp_path / "private.txt").write_text("a private note")
    (tmp_path / "data" / "a.txt").symlink_to(tmp_path / "private.txt")
    with pytest.raises(ValueError, match="its caption file a.txt leads outside the dataset folder"):
        scan_dataset(tmp_path / "data")


def test_metadata_cannot_point_outside_the_dataset(tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "secret.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "data" / "ok.png")
    rows = [{"file_name": "../secret.png", "text": "x"}, {"file_name": "ok.png", "text": "y"}]
    (tmp_path / "data" / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    dataset = scan_dataset(tmp_path / "data")
    assert [e.path.name for e in dataset.examples] == ["ok.png"]
    assert "outside the dataset folder" in dict(dataset.skipped)["../secret.png"]


def _zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ok.txt", b"harmless")
        for name, data in members.items():
            z.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return path


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("members", "link", "match"),
    [
        ({"../evil.txt": b"x"}, None, r"'../evil.txt' points outside"),
        ({"data/../../evil.txt": b"x"}, None, "points outside"),
        ({"..\\evil.txt": b"x"}, None, "points outside"),
        ({"/tmp/evil.txt": b"x"}, None, "absolute path"),
        ({"C:/evil.txt": b"x"}, None, "absolute path"),
        ({}, "evil-link", "'evil-link' is a symbolic link"),
    ],
)
def test_hostile_zip_is_refused_and_writes_nothing(tmp_path, members, link, match):
    archive = _zip(tmp_path / "set.zip", members, link)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=f"refusing to extract set.zip: .*{match}"):
        extract_zip(archive, tmp_path / "out" / "dest")
    assert _files(tmp_path) == before  # nothing written: not even the (empty) destination
    with pytest.raises(ValueError, match="refusing to extract"):
        train(TrainConfig(data=archive, output_dir=tmp_path / "run"))
    assert _files(tmp_path) == before  # the run folder made for the extraction is gone too


def test_zip_bomb_is_refused(tmp_path):
    archive = _zip(tmp_path / "bomb.zip", {"big.png": bytes(64 << 20)})  # 64 MiB of zeros, ~64 KiB compressed
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(ValueError, match=r"'big.png' expands \d+:1 \(limit 100:1; a zip bomb\?\)"):
        extract_zip(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    ("limits", "match"),
    [({"max_members": 2}, "3 members, more than the limit of 2"),
     ({"max_bytes": 100}, "unpacks to 1008 bytes, more than the limit of 100")],
)
def test_zip_limits(tmp_path, limits, match):
    archive = _zip(tmp_path / "set.zip", {"a.txt": bytes(500), "b.txt": bytes(500)})
    with pytest.raises(ValueError, match=match):
        extract_zip(archive, tmp_path / "dest", **limits)
    assert extract_zip(archive, tmp_path / "dest") == tmp_path / "dest"  # within the default limits
    assert _files(tmp_path / "dest") == {"ok.txt", "a.txt", "b.txt"}


def _zeros_zip(path: Path, suffix: str, n: int = 120) -> Path:
    """`n` members of 1 MiB of zeros each (each at the 1 MiB line below which one member is not ratio-checked) and
    two real images with captions."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(n):
            z.writestr(f"pad{i:03d}{suffix}", bytes(1 << 20))
        for image in sorted(BUNDLED_DATA.glob("*.png"))[:2]:
            z.write(image, image.name)
            z.write(image.with_suffix(".txt"), image.with_suffix(".txt").name)
    return path


def test_only_images_and_captions_leave_a_zip(tmp_path):
    """120 MiB of zeros in members that are not dataset files: nothing of them is written, each is named."""
    archive = _zeros_zip(tmp_path / "set.zip", ".bin")
    assert archive.stat().st_size < 1 << 20
    dataset = scan_dataset(archive, extract_to=tmp_path / "out")
    assert [e.path.name for e in dataset.examples] == ["demo_00.png", "demo_01.png"]
    assert sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()) < 1 << 20
    skipped = dict(dataset.skipped)
    assert len(skipped) == 120 and "not extracted from the zip" in skipped["pad000.bin"]


def test_many_small_members_that_expand_together_are_a_zip_bomb(tmp_path):
    archive = _zeros_zip(tmp_path / "set.zip", ".png")
    with pytest.raises(ValueError, match=r"refusing to extract set.zip: its 124 dataset files expand \d+:1 together "
                                         r"\(limit 100:1; a zip bomb of small members\?\)"):
        extract_zip(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_not_a_zip_is_a_clear_error(tmp_path):
    (tmp_path / "set.zip").write_bytes(b"PK but not really")
    with pytest.raises(ValueError, match="set.zip is not a readable zip file"):
        scan_dataset(tmp_path / "set.zip")


def test_zip_dataset_is_extracted_inside_the_run_folder(tmp_path, bundled_data, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for image in sorted(bundled_data.glob("*.png"))[:2]:
            z.write(image, f"pictures/{image.name}")
            z.write(image.with_suffix(".txt"), f"pictures/{image.with_suffix('.txt').name}")
        z.writestr("__MACOSX/pictures/._demo_00.png", b"resource fork")
    (tmp_path / "set.zip").write_bytes(buffer.getvalue())

    def no_temporary_folders(*args, **kwargs):
        raise AssertionError("a training run must not unpack into a temporary folder")

    monkeypatch.setattr("tempfile.mkdtemp", no_temporary_folders)
    run_dir = train(TrainConfig(data=tmp_path / "set.zip", output_dir=tmp_path / "run", max_steps=1))
    dataset = json.loads((run_dir / "config.json").read_text())["dataset"]
    assert dataset["root"] == str((run_dir / RunDir.DATASET / "pictures").resolve())
    assert dataset["images"] == 2 and dataset["skipped"] == []
    assert not (run_dir / RunDir.DATASET / "__MACOSX").exists()
