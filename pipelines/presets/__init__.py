"""Presets: named settings files shipped with opdiff (`opdiff train --preset NAME`, the GUI's preset field).

Each `<name>.toml` here holds a `description`, optionally the GPU memory it is sized for (`budget_gb`, checked
against `pipelines.memory`'s estimate in the tests), and a `[settings]` table of TrainConfig keys. A preset is
applied under everything the user gives: defaults < preset < config file < flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

FOLDER = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Preset:
    """One shipped settings file."""

    name: str
    description: str
    settings: dict[str, Any] = field(default_factory=dict)
    budget_gb: float | None = None
    """The accelerator memory it is sized for, in GiB; None for presets not sized for a GPU."""


def names() -> tuple[str, ...]:
    """The shipped presets' names, sorted."""
    return tuple(sorted(p.stem for p in FOLDER.glob("*.toml")))


def load(name: str) -> Preset:
    """Return the preset `name`; ValueError naming the setting and the known presets otherwise."""
    path = FOLDER / f"{name}.toml"
    if name not in names():
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(names())}")
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return Preset(name, raw["description"], dict(raw.get("settings", {})), raw.get("budget_gb"))


def settings(name: str) -> dict[str, Any]:
    """The settings of preset `name` (see `load`)."""
    return load(name).settings
