"""Read a captioned image set and turn its images into training views.

A dataset is a folder of images with same-name `.txt` captions, or a folder with a `metadata.jsonl`, or a `.zip`
of either. `scan_dataset` runs before any model loads: it decodes every image once, reports every file it does
not use by name with the reason, and fails with a clear error when nothing usable is left. Zips are checked
member by member before anything is written (no absolute paths, no `..`, no links, size and ratio limits), and
only images, captions and metadata.jsonl are extracted. Links (zip members, or symbolic links in a folder) never
lead a dataset outside its folder: one that points outside is skipped and named, whichever way it is listed.

A training view of an image is: resize so an aspect-ratio bucket fits, crop the bucket out, maybe flip it. The
view also gives SDXL's micro-conditioning (original size, crop corner, target size; SDXL paper Sec. 2.2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipelines.rundir import EXTRACTED_MARKER

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
CAPTION_EXTENSION = ".txt"

MIN_IMAGE_SIDE = 32
"""Images with a shorter side (in pixels) are skipped: a 1x1 or 16x16 image carries nothing to learn at SDXL scale."""
MAX_IMAGE_PIXELS = 1 << 27
"""Images with more pixels (134M, e.g. 16384 x 8192) are skipped before decoding: decompression-bomb guard."""

MAX_ZIP_MEMBERS = 20_000
"""Most members a dataset zip may hold (any kind, extracted or not)."""
MAX_ZIP_BYTES = 8 << 30
"""Total uncompressed size a dataset zip may unpack to (8 GiB)."""
MAX_ZIP_RATIO = 100
"""Largest uncompressed / compressed ratio of one zip member, and of all extracted members together; images barely
compress, zip bombs compress ~1000:1."""
ZIP_RATIO_FLOOR = 1 << 20
"""Members (and archives) below this (1 MiB uncompressed) are not ratio-checked: small text files compress well,
legitimately. Many small members that each pass are still checked together."""

# SDXL's recommended resolutions (width, height) at 1024 px: the nine aspect ratios its multi-aspect
# fine-tuning covers well (SDXL paper App. I lists the full training set; these are its commonly used core).
SDXL_BUCKETS = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
    (1344, 768), (768, 1344), (1536, 640), (640, 1536),
)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Example:
    """One usable image and its caption."""

    path: Path
    caption: str
    size: tuple[int, int]
    """(height, width) as the image is seen (after its EXIF orientation)."""
    sha256: str
    """Hex digest of the file's bytes: the image's identity in the latent cache."""


@dataclass
class Dataset:
    """A dataset's usable examples, the files skipped or converted and why, and a content hash."""

    root: Path
    examples: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file name, reason) for every file that was not used."""
    hash: str = ""
    """sha256 over every used image's bytes and caption: equal hashes mean equal training data."""
    converted: list[tuple[str, str]] = field(default_factory=list)
    """(file name, what was done) for used images that were not plain 8-bit RGB (CMYK, palette, alpha, 16-bit)."""

    def __len__(self) -> int:
        return len(self.examples)


def scan_dataset(
    path: str | Path,
    *,
    caption: str | None = None,
    extract_to: str | Path | None = None,
    min_side: int = MIN_IMAGE_SIDE,
    max_pixels: int = MAX_IMAGE_PIXELS,
    allow_empty: bool = False,
) -> Dataset:
    """Return the usable examples under `path` (a folder or a `.zip`), each image fully decoded once to check it.

    With a `metadata.jsonl` (lines `{"file_name": ..., "text": ...}`) the captions come from it; otherwise each
    image's caption is its same-name `.txt` file. `caption` is used for images that have none (else they are
    skipped). A zip is checked and extracted into `extract_to` (a folder this function owns: replaced when it
    holds another archive's files; default: a new temporary folder the caller deletes). Every file not used is
    logged by name with the reason and listed in `Dataset.skipped`. Raises ValueError when the zip is refused or
    no usable example remains (with `allow_empty`, an empty Dataset is returned instead).
    """
    root = _unpacked(Path(path), None if extract_to is None else Path(extract_to))
    if (root / METADATA_FILE).is_file():
        candidates, skipped = _metadata_entries(root, caption)
    else:
        candidates, skipped = _folder_entries(root, caption)
    if root != Path(path):  # from a zip: what it held but was not extracted
        skipped = zip_skipped(path) + skipped
    examples, converted, digest = [], [], hashlib.sha256()
    for image_path, text in candidates:
        size, problem, note = _check_image(image_path, min_side, max_pixels)
        if problem:
            skipped.append((image_path.name, problem))
            continue
        data = image_path.read_bytes()
        examples.append(Example(image_path, text, size, hashlib.sha256(data).hexdigest()))
        digest.update(bytes.fromhex(examples[-1].sha256) + text.encode("utf-8") + b"\0")
        if note:
            converted.append((image_path.name, note))
    for name, reason in skipped:
        log.warning("skipping %s: %s", name, reason)
    for name, note in converted:
        log.info("using %s: %s", name, note)
    if not examples and not allow_empty:
        detail = "; ".join(f"{n}: {r}" for n, r in skipped) or f"no {'/'.join(IMAGE_EXTENSIONS)} files found"
        raise ValueError(f"dataset {path} has no usable images ({detail})")
    return Dataset(root, examples, skipped, digest.hexdigest(), converted)


# ----------------------------------------------------------------------------------------------------------
# Zip archives


def extract_zip(
    archive: str | Path,
    dest: str | Path,
    *,
    max_members: int = MAX_ZIP_MEMBERS,
    max_bytes: int = MAX_ZIP_BYTES,
    max_ratio: float = MAX_ZIP_RATIO,
) -> Path:
    """Extract the dataset files of `archive` into `dest` (created; must not exist or be empty) and return `dest`.

    Every member is checked before anything is written; the archive is refused (ValueError naming the members)
    for absolute paths, `..` components, symbolic links, encrypted members, more than `max_members` members,
    more than `max_bytes` uncompressed, a member larger than 1 MiB that compressed better than `max_ratio`:1, or
    extracted members that do so together (a zip bomb). Only images, `.txt` captions and metadata.jsonl are
    written (`zip_skipped` names the rest). Sizes are enforced again while writing, since a zip header can lie.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        z = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{archive.name} is not a readable zip file ({e})") from e
    with z:
        members = [i for i in z.infolist() if not _zip_junk(i.filename)]
        problems = _zip_problems(members, max_members, max_bytes, max_ratio)
        wanted = [i for i in members if _dataset_member(i.filename)]
        total, packed = sum(i.file_size for i in wanted), sum(i.compress_size for i in wanted)
        if not problems and total > ZIP_RATIO_FLOOR and total > max_ratio * max(packed, 1):
            problems.append(f"its {len(wanted)} dataset files expand {total / max(packed, 1):.0f}:1 together "
                            f"(limit {max_ratio:g}:1; a zip bomb of small members?)")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"refusing to extract {archive.name}: {'; '.join(problems[:5])}{more}")
        if dest.exists() and any(dest.iterdir()):
            raise ValueError(f"cannot extract {archive.name} into {dest}: the folder is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            _write_members(z, wanted, dest.resolve(), max_bytes)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return dest


def _zip_junk(name: str) -> bool:
    """macOS resource forks and folder metadata: never part of a dataset."""
    return name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1] == ".DS_Store"


def _dataset_member(name: str) -> bool:
    """Whether a zip member is dataset content (an image, a caption, metadata.jsonl): the members extracted."""
    base = re.split(r"[\\/]+", name)[-1]
    return base == METADATA_FILE or Path(base).suffix.lower() in (*IMAGE_EXTENSIONS, CAPTION_EXTENSION)


def zip_skipped(archive: str | Path) -> list[tuple[str, str]]:
    """Return (member, reason) for every file in a dataset zip that `extract_zip` does not write."""
    with zipfile.ZipFile(archive) as z:
        members = [i.filename for i in z.infolist() if not i.is_dir() and not _zip_junk(i.filename)]
    return [(name, "not an image, caption or metadata.jsonl: not extracted from the zip")
            for name in members if not _dataset_member(name)]


def _zip_problems(members: list[zipfile.ZipInfo], max_members: int, max_bytes: int, max_ratio: float) -> list[str]:
    problems = []
    if len(members) > max_members:
        problems.append(f"{len(members)} members, more than the limit of {max_members}")
    total = sum(i.file_size for i in members)
    if total > max_bytes:
        problems.append(f"unpacks to {total} bytes, more than the limit of {max_bytes}")
    for info in members:
        name, parts = info.filename, re.split(r"[\\/]+", info.filename)
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            problems.append(f"{name!r} has an absolute path")
        elif ".." in parts:
            problems.append(f"{name!r} points outside the archive folder (..)")
        elif stat.S_ISLNK(info.external_attr >> 16):
            problems.append(f"{name!r} is a symbolic link")
        elif info.flag_bits & 0x1:
            problems.append(f"{name!r} is encrypted")
        elif info.file_size > ZIP_RATIO_FLOOR and info.file_size > max_ratio * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            problems.append(f"{name!r} expands {ratio:.0f}:1 (limit {max_ratio:g}:1; a zip bomb?)")
    return problems


def _write_members(z: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path, max_bytes: int) -> None:
    written = 0
    for info in members:
        target = dest.joinpath(*[p for p in re.split(r"[\\/]+", info.filename) if p not in ("", ".")])
        if not target.resolve().is_relative_to(dest):  # belt and braces: the checks above already rule this out
            raise ValueError(f"refusing to extract {info.filename!r}: it resolves outside {dest}")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        left = info.file_size
        try:
            with z.open(info) as src, target.open("xb") as out:
                while chunk := src.read(1 << 20):
                    left -= len(chunk)
                    written += len(chunk)
                    if left < 0 or written > max_bytes:
                        raise ValueError(f"refusing to extract {info.filename!r}: it is larger than its header says")
                    out.write(chunk)
        except FileExistsError as e:
            raise ValueError(f"refusing to extract: {info.filename!r} appears twice in the archive") from e
        except zipfile.BadZipFile as e:
            raise ValueError(f"cannot extract {info.filename!r}: {e}") from e


def _unpacked(path: Path, extract_to: Path | None) -> Path:
    """A folder holding the dataset: `path` itself, or a `.zip` extracted (safely) to `extract_to`."""
    if path.is_dir():
        return path
    if not (path.is_file() and path.suffix.lower() == ".zip"):
        raise ValueError(f"dataset {path} is neither a folder nor a .zip file")
    if extract_to is None:
        out = Path(tempfile.mkdtemp(prefix="opdiff-data-"))
        try:
            extract_zip(path, out)
        except ValueError:
            shutil.rmtree(out, ignore_errors=True)
            raise
    else:
        out = extract_to
        identity = _file_sha256(path)
        marker = out / EXTRACTED_MARKER
        if not (marker.is_file() and marker.read_text(encoding="utf-8") == identity):
            if out.exists():
                if not marker.is_file():
                    raise ValueError(f"cannot extract {path.name} into {out}: it exists and was not made by opdiff")
                shutil.rmtree(out)  # an earlier extraction of another archive: ours to replace
            extract_zip(path, out)
            marker.write_text(identity, encoding="utf-8")
    # A zip of a folder holds that folder; use it when it is the only thing inside.
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else out


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Captions


def _read_caption(path: Path) -> str:
    return path.read_text(encoding="utf-8-sig").strip()  # utf-8-sig: editors on Windows write a BOM


def _outside(path: Path, root: Path) -> str | None:
    """Why `path` is not read as part of the dataset in `root`: it leads outside the folder (by `..` or a symbolic
    link), which folder and metadata.jsonl datasets refuse alike; None when it stays inside."""
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    return f"leads outside the dataset folder (to {target}); links out of a dataset are not followed: copy the file in"


def _folder_entries(root: Path, fallback: str | None) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    entries, skipped = [], []
    files = sorted(root.iterdir())
    image_stems = {p.stem for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    for p in files:
        suffix = p.suffix.lower()
        if p.name.startswith("."):
            continue  # hidden files (.DS_Store, our extraction marker): never dataset content
        if p.is_dir():
            skipped.append((p.name + "/", "a folder: only files directly in the dataset folder are read"))
        elif suffix == CAPTION_EXTENSION:
            if p.stem not in image_stems:
                skipped.append((p.name, "a caption file with no image of the same name"))
        elif suffix not in IMAGE_EXTENSIONS:
            skipped.append((p.name, f"not an image file (only {', '.join(IMAGE_EXTENSIONS)} are read)"))
        elif outside := _outside(p, root):
            skipped.append((p.name, outside))
        else:
            caption_file = p.with_suffix(CAPTION_EXTENSION)
            if caption_file.exists() and (outside := _outside(caption_file, root)):
                skipped.append((p.name, f"its caption file {caption_file.name} {outside}"))
            elif caption_file.is_file():
                try:
                    entries.append((p, _read_caption(caption_file)))
                except (OSError, UnicodeDecodeError) as e:
                    skipped.append((p.name, f"caption file unreadable: {e}"))
            elif fallback is not None:
                entries.append((p, fallback))
            else:
                skipped.append((p.name, f"no caption file {caption_file.name} (set a fallback caption to use it)"))
    return entries, skipped


def _metadata_entries(root: Path, fallback: str | None) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    entries, skipped, listed = [], [], set()
    lines = (root / METADATA_FILE).read_text(encoding="utf-8-sig").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{METADATA_FILE} line {n}"
        try:
            row = json.loads(line)
            name = row["file_name"]
            text = row.get("text", fallback)
            if not isinstance(name, str) or text is None:
                raise KeyError("text")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            skipped.append((where, f"needs a JSON object with file_name and text ({type(e).__name__}: {e})"))
            continue
        p = root / name
        listed.add(p.name)
        if outside := _outside(p, root):
            skipped.append((name, f"listed in {where} but {outside}"))
        elif p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append((name, f"extension not one of {', '.join(IMAGE_EXTENSIONS)}"))
        elif not p.is_file():
            skipped.append((name, f"listed in {where} but not found"))
        else:
            entries.append((p, str(text).strip()))
    for p in sorted(root.iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in listed:
            skipped.append((p.name, f"not listed in {METADATA_FILE}"))
    return entries, skipped


# ----------------------------------------------------------------------------------------------------------
# Decoding


def open_rgb(path: str | Path) -> tuple[Image.Image, str | None]:
    """Return (the image as 8-bit RGB, upright by its EXIF orientation; a note on any conversion, else None).

    Transparent pixels are composited over white (dropping alpha would expose whatever colour they hide);
    16-bit grey is scaled to 8 bits (a plain convert clips it to white); CMYK, palette and grey are converted.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size limit is ours: _check_image
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # a copy, fully loaded
    return to_rgb(im)


def to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Return (`im` as 8-bit RGB, a note saying how it was converted or None when it already was)."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(im).astype(np.float64)  # (H, W)
        if mode.startswith("I;16") or values.max() > 255:
            values = values / 257.0  # 16-bit range: 65535 -> 255
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # (H, W) uint8 -> mode L
        return grey.convert("RGB"), f"{mode} grey converted to 8-bit RGB"
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (*WHITE, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} with transparency composited over white"
    return im.convert("RGB"), f"converted from {mode}"


def _check_image(path: Path, min_side: int, max_pixels: int) -> tuple[tuple[int, int], str | None, str | None]:
    """((height, width), why the file is unusable or None, conversion note or None), decoding every pixel once."""
    if path.stat().st_size == 0:
        return (0, 0), "empty file (0 bytes)", None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:  # judged from the header: nothing is decoded
                    return (h, w), f"image too large: {w}x{h} = {w * h} pixels (limit {max_pixels})", None
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))  # DCT-scaled decode still reads every byte
                im.load()  # catches truncated and corrupt files that `verify()` lets through
                _, note = to_rgb(im)
                orientation = im.getexif().get(0x0112, 1)
    except Image.DecompressionBombError as e:
        return (0, 0), f"image too large: {e}", None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; report any of them
        return (0, 0), f"not a readable image ({type(e).__name__}: {e})", None
    size = (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # EXIF 5-8 rotate by 90 degrees
    if min(size) < min_side:
        return size, f"too small: {w}x{h} pixels (the shorter side must be at least {min_side})", None
    return size, None, note


# ----------------------------------------------------------------------------------------------------------
# Buckets and views


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """Return SDXL's aspect-ratio buckets scaled to `resolution`, as (height, width), square first.

    At 1024 these are SDXL's sizes, sides multiples of 64. Scaled, sides are multiples of 64 * resolution / 1024
    rounded to a multiple of 8 (at least 8, the VAE's factor): 32 at 512, 8 at 64. Duplicates are dropped.
    """
    quantum = 8 * max(1, round(resolution / 128))
    sizes = []
    for w, h in SDXL_BUCKETS:
        size = tuple(max(quantum, math.floor(side * resolution / 1024 / quantum + 0.5) * quantum) for side in (h, w))
        if size not in sizes:
            sizes.append(size)
    return sizes


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """Return the bucket (height, width) whose aspect ratio is closest to `size`'s (in log ratio; ties: first)."""
    ratio = math.log(size[1] / size[0])
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def resized_size(original: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Return the (height, width) `original` is resized to so that `target` just fits inside it (aspect kept)."""
    scale = max(target[0] / original[0], target[1] / original[1])
    return max(target[0], round(original[0] * scale)), max(target[1], round(original[1] * scale))


@dataclass(frozen=True)
class View:
    """One training input cut from an image: resize to `resized`, crop `size` at (`top`, `left`), maybe flip.

    Sizes are (height, width) in pixels; the crop corner is in the resized, unflipped image.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int
    size: tuple[int, int]
    flip: bool = False

    def time_ids(self) -> list[int]:
        """SDXL's added time ids: original (h, w), crop (top, left), target (h, w).

        The crop corner is where the crop sits in the image the U-Net sees: after a horizontal flip, the
        flipped image's left edge is the original's right edge, so `left` is measured from the right.
        """
        left = self.resized[1] - self.left - self.size[1] if self.flip else self.left
        return [*self.original, self.top, left, *self.size]


def center_view(original: tuple[int, int], target: tuple[int, int], flip: bool = False) -> View:
    """Return the view that resizes `original` to cover `target` and crops the middle."""
    resized = resized_size(original, target)
    return View(original, resized, (resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2, target, flip)


def crop_region(original: tuple[int, int], target: tuple[int, int], step: int) -> View:
    """Return the centered part of the resized image that holds every `step`-aligned random crop of `target`.

    Its size is `target` plus the whole `step`s of slack on each axis: random crops are drawn at multiples of
    `step` (the VAE's factor) inside it, so a latent of this region can be cropped instead of re-encoding.
    """
    resized = resized_size(original, target)
    slack = [(r - t) // step * step for r, t in zip(resized, target, strict=True)]
    top, left = ((r - t - s) // 2 for r, t, s in zip(resized, target, slack, strict=True))
    return View(original, resized, top, left, (target[0] + slack[0], target[1] + slack[1]))


def load_view(path: str | Path, view: View) -> torch.Tensor:
    """Return the pixels of `view` of the image at `path`: (3, height, width) float32 in [-1, 1]."""
    im, _ = open_rgb(path)
    if (im.height, im.width) != view.original:
        raise ValueError(f"{Path(path).name} is {im.height}x{im.width} now, {view.original} when scanned")
    im = im.resize(view.resized[::-1], Image.Resampling.BICUBIC)
    im = im.crop((view.left, view.top, view.left + view.size[1], view.top + view.size[0]))
    if view.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0  # (3, h, w)
