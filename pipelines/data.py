"""Read a captioned image set: a folder of images with same-name `.txt` captions, or a `metadata.jsonl`.

`scan_dataset` runs before any model loads: it decodes every image once, reports bad files by name with the
reason and skips them, and fails with a clear error when nothing usable is left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class Example:
    """One usable image and its caption."""

    path: Path
    caption: str


@dataclass
class Dataset:
    """The usable examples of a dataset folder, the files that were skipped and why, and a content hash."""

    root: Path
    examples: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file name, reason) for every file that was not used."""
    hash: str = ""
    """sha256 over every used image's bytes and caption: equal hashes mean equal training data."""

    def __len__(self) -> int:
        return len(self.examples)


def scan_dataset(path: str | Path) -> Dataset:
    """Return the usable examples under `path` (a folder or a `.zip`), each image fully decoded once to check it.

    With a `metadata.jsonl` (lines `{"file_name": ..., "text": ...}`) the captions come from it; otherwise every
    image needs a same-name `.txt` file. Bad entries (corrupt, zero-byte, unreadable, missing caption) are
    logged by name with the reason, listed in `Dataset.skipped`, and left out. Raises ValueError when no
    usable example remains.
    """
    root = _unpacked(Path(path))
    candidates, skipped = _metadata_entries(root) if (root / METADATA_FILE).is_file() else _folder_entries(root)
    examples, digest = [], hashlib.sha256()
    for image_path, caption in candidates:
        reason = _check_image(image_path)
        if reason:
            skipped.append((image_path.name, reason))
            continue
        examples.append(Example(image_path, caption))
        digest.update(hashlib.sha256(image_path.read_bytes()).digest() + caption.encode("utf-8") + b"\0")
    for name, reason in skipped:
        log.warning("skipping %s: %s", name, reason)
    if not examples:
        detail = "; ".join(f"{n}: {r}" for n, r in skipped) or f"no {'/'.join(IMAGE_EXTENSIONS)} files found"
        raise ValueError(f"dataset {path} has no usable images ({detail})")
    return Dataset(root, examples, skipped, digest.hexdigest())


def _unpacked(path: Path) -> Path:
    """A folder holding the dataset: `path` itself, or a `.zip` extracted to a temporary folder."""
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".zip":
        out = Path(tempfile.mkdtemp(prefix="opdiff-data-"))
        with zipfile.ZipFile(path) as z:
            z.extractall(out)  # zipfile drops absolute paths and ".." from member names
        # A zip of a folder holds that folder; use it when it is the only thing inside.
        entries = [p for p in out.iterdir() if not p.name.startswith(("__MACOSX", "."))]
        return entries[0] if len(entries) == 1 and entries[0].is_dir() else out
    raise ValueError(f"dataset {path} is neither a folder nor a .zip file")


def _folder_entries(root: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    entries, skipped = [], []
    for p in sorted(root.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        caption_file = p.with_suffix(".txt")
        if not caption_file.is_file():
            skipped.append((p.name, f"no caption file {caption_file.name}"))
            continue
        try:
            entries.append((p, caption_file.read_text(encoding="utf-8").strip()))
        except (OSError, UnicodeDecodeError) as e:
            skipped.append((p.name, f"caption file unreadable: {e}"))
    return entries, skipped


def _metadata_entries(root: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    entries, skipped = [], []
    lines = (root / METADATA_FILE).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{METADATA_FILE} line {n}"
        try:
            row = json.loads(line)
            name, caption = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            skipped.append((where, f"needs a JSON object with file_name and text ({type(e).__name__}: {e})"))
            continue
        p = root / name
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append((name, f"extension not one of {', '.join(IMAGE_EXTENSIONS)}"))
        elif not p.is_file():
            skipped.append((name, f"listed in {where} but not found"))
        else:
            entries.append((p, str(caption).strip()))
    return entries, skipped


def _check_image(path: Path) -> str | None:
    """None if the file decodes as an image, else the reason it does not."""
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as im:
            im.load()  # decodes every pixel: catches truncated and corrupt files that `verify()` lets through
    except Image.DecompressionBombError as e:
        return f"image too large: {e}"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; report any of them
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def load_image(path: Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Return (pixels, original size, crop top-left) for one image, ready for the VAE.

    pixels: (3, resolution, resolution) in [-1, 1]. The image is converted to RGB (any mode), its shorter side
    resized to `resolution` (bicubic), then center-cropped. Sizes are (height, width) and the crop corner is
    (top, left) in the resized image: SDXL's micro-conditioning inputs.
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
    original = (im.height, im.width)
    scale = resolution / min(im.size)
    w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    top, left = (h - resolution) // 2, (w - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)
    return pixels, original, (top, left)
