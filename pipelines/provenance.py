"""What a shipped file may say about where it came from: names and hashes, never a path of the trainer's machine.

A run's config.json records where the base model, the data and the run folder were (absolute paths: it has to
find them again). A LoRA that is shared must not carry them, so its header gets `shipped_config`: the same settings
with every path reduced to its last component, the base and VAE named by `model_identity` (a hub id, or a file
name with the file's SHA-256, the hash AUTOMATIC1111 and sd-scripts show for a checkpoint).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

HASH_BLOCK = 1 << 20
# Settings that hold paths: (section of the run config, key); None is the top level.
PATH_SETTINGS = (
    (None, "base"), ("train", "base"), ("train", "vae"), ("train", "data"), ("train", "output_dir"),
    ("train", "cache_dir"), ("train", "resume"), ("dataset", "path"), ("dataset", "root"),
)


def model_identity(source: str | Path | None) -> dict[str, str] | None:
    """Return how a shipped file names a model: {"name": ...} plus {"sha256": ...} for a single file.

    A local file gives its name and SHA-256 (sd-scripts' `ss_new_sd_model_hash`, AUTOMATIC1111's checkpoint hash);
    a local folder its name; anything else is taken as a hub id and kept as given. None gives None.
    """
    if source is None:
        return None
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return {"name": path.name, "sha256": file_sha256(path)}
    if path.is_dir() or is_absolute(text):
        return {"name": path.name}
    return {"name": text}  # a hub id (or a relative path that is gone: relative, so it reveals nothing)


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file, cached per (path, size, modification time)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def is_absolute(text: str) -> bool:
    """Whether `text` is an absolute path on any system (POSIX, Windows drive or UNC) or starts with `~`."""
    return PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or text.startswith("~")


def shipped_config(run_config: dict) -> dict:
    """Return a copy of a run config fit to ship: every path setting reduced to its name, the base model and VAE
    named by `model_identity`, and any other absolute path (whole value, or inside a message) likewise."""
    shipped = copy.deepcopy(run_config)
    private = set()
    for section, key in PATH_SETTINGS:
        holder = shipped if section is None else shipped.get(section)
        if not isinstance(holder, dict) or holder.get(key) is None:
            continue
        value = str(holder[key])
        if is_absolute(value):
            private.add(value)
        identity = model_identity(value) if key in ("base", "vae") else None
        holder[key] = identity["name"] if identity is not None else _name(value)
    # Longest first, so a folder's path is replaced before the path of a folder that holds it.
    prefixes = sorted(private | {os.path.dirname(p) for p in private if os.path.dirname(p) not in ("", "/")},
                      key=len, reverse=True)
    return scrub_paths(shipped, prefixes)


def _name(value: str) -> str:
    """The last component of a path (of either system's form), or the value itself when it has none."""
    name = PureWindowsPath(value).name if "\\" in value else PurePosixPath(value).name
    return name or value


def scrub_paths(value: Any, prefixes: list[str] | tuple[str, ...] = ()) -> Any:
    """Return `value` (nested JSON: dicts, lists, strings, numbers) with every string that is an absolute path
    reduced to its name, and each of `prefixes` (absolute paths, longest first) inside a string likewise."""
    if isinstance(value, dict):
        return {k: scrub_paths(v, prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v, prefixes) for v in value]
    if not isinstance(value, str):
        return value
    if is_absolute(value):
        return _name(value)
    for prefix in prefixes:
        if prefix in value:
            value = value.replace(prefix, _name(prefix))
    return value
