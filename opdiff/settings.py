"""One description of each setting: what argparse, config files and the GUI form are all built from.

A `Setting` says what a user may set: name, type, default, a plain-language help line, the group it is shown in,
and the paper it comes from. Config dataclasses declare theirs with `option(...)`; adapter methods declare their
own in their file (`opdiff.methods`). `Settings` is the base of every config dataclass: it turns the flat keys
users write (`--op-width 32`, `op_width = 32`) into nested dataclasses and back.

Pure data: imports nothing of opdiff, so every layer (opdiff, pipelines, the GUI) can describe settings with it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

GROUPS = ("run", "basic", "method", "data", "optimization", "sampling", "advanced")
"""Where a setting is shown, in order: `run` (what to train on and where), `basic` (what most runs change),
`method` (read only by some adapter methods), `data` (captions, crops, buckets), `optimization` (schedule,
accumulation, clipping, loss weighting), `sampling` (preview images), `advanced` (memory, speed, devices)."""


@dataclass(frozen=True)
class Setting:
    """A user-facing setting: the one description that flags, config-file keys and GUI fields are made from."""

    name: str
    """Key in config files and the dataclass; the flag is `--<name with dashes>`."""
    type: Any
    """int, float, str, bool, Path, tuple[X, ...] or Literal[...]; see `base_type`."""
    default: Any
    help: str
    """Plain-language help: what it does and when to change it."""
    group: str = "advanced"
    ref: str = ""
    """Where the setting comes from (e.g. "op-lora.txt Sec. 4.1"): shown as a second line, never instead of help."""
    label: str = ""
    """Short title for the GUI; empty: the name with spaces."""
    optional: bool = False
    """None is allowed and means `none_means`."""
    none_means: str = ""
    """What an empty value does (shown in help), e.g. "the base model's native size"."""
    minimum: float | None = None
    """Smallest allowed value of a number (inclusive)."""
    above: float | None = None
    """Smallest excluded value of a number: the value must be greater (e.g. a learning rate above 0)."""
    maximum: float | None = None
    reason: str = ""
    """Why the range is what it is (e.g. "a VAE latent of at least 4 x 4"): said with every refusal of a value."""
    choices: tuple | None = None
    """The allowed values (a Literal type gives them too)."""
    choice_help: tuple[str, ...] = ()
    """One plain line per choice, in the order of `choices` (e.g. what each adapter method does)."""
    read_by: tuple[str, ...] | None = None
    """The adapter methods that read this setting; None: all of them (the GUI shows it only for those)."""
    off_flag: str | None = None
    """For booleans: the flag that turns the setting off (default `--no-<name>`)."""
    positional: bool = False
    """A positional command-line argument rather than a `--flag` (e.g. a run folder)."""
    required: bool = False
    """No default: the user must give it."""
    cli: bool = True
    """Offered on the command line (False: set only from code or the GUI)."""
    picks: str = ""
    """For a path: what a GUI offers to pick it from, besides typing it. "run": the finished runs of its output
    folder whose file is a plain LoRA."""
    absent: Any = None
    """What a saved config written before this setting existed meant by leaving it out, when that differs from
    `default` (a new default must not change how an old run resumes); None: the default."""

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"setting {self.name!r}: unknown group {self.group!r}; choose one of {GROUPS}")

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. `--op-width`."""
        return "--" + self.name.replace("_", "-")

    @property
    def title(self) -> str:
        """The GUI label."""
        return self.label or self.name.replace("_", " ")

    @property
    def base_type(self) -> Any:
        """The type without `| None`."""
        return _unwrap_optional(self.type)

    @property
    def allowed(self) -> tuple | None:
        """The allowed values: `choices`, or those of a Literal type; None when any value of the type goes."""
        if self.choices is not None:
            return tuple(self.choices)
        tp = self.base_type
        return typing.get_args(tp) if typing.get_origin(tp) is Literal else None

    def applies_to(self, method: str) -> bool:
        """True when `method` reads this setting."""
        return self.read_by is None or method in self.read_by

    @property
    def is_list(self) -> bool:
        """True for tuple settings (several values: `--flag a b c`, a list in files, one per line in the GUI)."""
        return typing.get_origin(self.base_type) is tuple

    @property
    def item_type(self) -> Any:
        """The type of one value (the element type for tuple settings)."""
        tp = self.base_type
        return typing.get_args(tp)[0] if self.is_list else tp

    def full_help(self) -> str:
        """Help with what an empty value means and the reference, for `--help`."""
        text = self.help
        if self.optional and self.none_means:
            text += f" Empty: {self.none_means}."
        if self.ref:
            text += f" ({self.ref})"
        return text

    def convert(self, value: Any) -> Any:
        """Return `value` (from a file, a flag or a form) as this setting's type; raise ValueError naming it."""
        if value is None or (value == "" and self.optional):
            if not self.optional:
                raise ValueError(f"{self.name} needs a value")
            return None
        if self.is_list:
            if isinstance(value, str):  # a GUI text box: one value per line
                value = [v.strip() for v in value.splitlines() if v.strip()]
            return tuple(self._one(v) for v in value)
        return self._one(value)

    def _one(self, value: Any) -> Any:
        tp = self.item_type
        choices = self.allowed
        if choices is not None:
            if value not in choices:
                raise ValueError(f"unknown {self.name} {value!r}; choose one of: {', '.join(map(str, choices))}")
            return value
        try:
            if tp is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError("expected true or false")
                    return value.lower() in ("true", "1", "yes")
                return bool(value)
            if tp is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError("expected a whole number")
                if isinstance(value, bool):
                    raise ValueError("expected a whole number")
                value = int(value)
            elif tp is float:
                value = float(value)
            elif tp is Path:
                value = Path(value)
            elif tp is str:
                value = str(value).strip() if isinstance(value, str) else str(value)
            else:
                value = tp(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.name}: {value!r} is not valid ({e})") from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise ValueError naming the setting when a number is out of its range."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        why = f" ({self.reason})" if self.reason else ""
        if not math.isfinite(value):
            raise ValueError(f"{self.name} must be a finite number, got {value}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name} must be >= {self.minimum:g}, got {value}{why}")
        if self.above is not None and value <= self.above:
            raise ValueError(f"{self.name} must be > {self.above:g}, got {value}{why}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.name} must be <= {self.maximum:g}, got {value}{why}")


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **describe: Any) -> Any:
    """Declare a dataclass field as a user-facing setting (`help`, `group`, `ref`, `minimum`, ...; see Setting).

    Name and type come from the field itself, so they are written once.
    """
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"setting": {"help": help, **describe}})
    return field(default=default, metadata={"setting": {"help": help, **describe}})


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _default(f: dataclasses.Field) -> Any:
    """The field's default; None for a required field (a positional argument)."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


class Settings:
    """Base of the config dataclasses: their settings, flat for users, nested in code.

    A field declared with `option(...)` is a setting; a field whose type is another `Settings` dataclass is nested
    and its settings appear flat beside the others (`TrainConfig.adapter` -> `--rank`, `rank = 4`). Subclasses may
    add settings that are not fields by overriding `extra_settings` (adapter methods' own settings).
    """

    @classmethod
    def settings(cls) -> list[Setting]:
        """Every setting of this config, nested configs' included, in declaration order."""
        hints = typing.get_type_hints(cls)
        out: list[Setting] = []
        for f in fields(cls):  # type: ignore[arg-type]
            tp = hints[f.name]
            if isinstance(tp, type) and issubclass(tp, Settings):
                out += tp.settings()
            elif "setting" in f.metadata:
                required = f.default is MISSING and f.default_factory is MISSING
                out.append(Setting(f.name, tp, _default(f), optional=_is_optional(tp), required=required,
                                   **f.metadata["setting"]))
        return out + cls.extra_settings()

    @classmethod
    def extra_settings(cls) -> list[Setting]:
        """Settings that are not fields of the dataclass (none by default)."""
        return []

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "") -> Any:
        """Build the config from flat settings (a config file, flags or a form); unknown keys are refused by name.

        Values are converted to each setting's type (a list becomes a tuple, a string a Path, ...). `source`
        names where the values came from, for the error message.
        """
        known = {s.name: s for s in cls.settings()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            where = f" in {source}" if source else ""
            raise ValueError(f"unknown setting(s){where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        converted = {k: known[k].convert(v) for k, v in values.items()}
        return cls._build(converted)

    @classmethod
    def _build(cls, values: dict[str, Any]) -> Any:
        """Make the dataclass from converted flat values: nested configs take their own keys."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in fields(cls):  # type: ignore[arg-type]
            tp = hints[f.name]
            if isinstance(tp, type) and issubclass(tp, Settings):
                mine = {s.name for s in tp.settings()}
                kwargs[f.name] = tp._build({k: v for k, v in values.items() if k in mine})
            elif f.name in values:
                kwargs[f.name] = values[f.name]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Return the flat settings as JSON-ready values (paths as strings, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Settings):
                out.update(value.to_dict())
            elif "setting" in f.metadata:
                out[f.name] = plain_value(value)
        return out

    def replace(self, **changes: Any) -> Any:
        """Return a copy with flat `changes` applied (nested settings included), converted and validated."""
        return type(self).from_dict({**self.to_dict(), **changes})


def plain_value(value: Any) -> Any:
    """A setting's value as JSON has it: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    return value
