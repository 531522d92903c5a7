"""The one configuration object for an adapter: the CLI, the GUI and config files all fill this dataclass.

`AdapterConfig` holds what every method reads (method, rank, alpha, targets) as fields, and the methods' own
settings (declared in their files, e.g. `op_width` in `opdiff/methods/op.py`) in `options`, readable as
attributes (`config.op_width`). Its flat dict form (`to_dict`) is what run folders and exported files store.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from opdiff.methods import METHODS, method_settings
from opdiff.settings import Setting, Settings, option, plain_value

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(init=False)
class AdapterConfig(Settings):
    """How to adapt a model. Defaults follow op-lora.txt Sec. 4.1 (SDXL: r=4, attention projections).

    Method settings are keyword arguments too: `AdapterConfig(method="op-lora", op_width=64)`.
    """

    method: str = option(
        "lora", "Adapter method: how the adapter is trained. Every method exports an ordinary LoRA (DoRA methods a "
        "DoRA) file.", group="basic", label="method")
    rank: int = option(
        4, "LoRA rank: the size of the adapter. Higher learns more detail and makes a bigger file.",
        group="basic", ref="A is (r x d_in), B is (d_out x r); op-lora.txt Sec. 4.1 uses 4", minimum=1)
    alpha: float = option(
        4.0, "LoRA alpha: the adapter's strength is alpha / rank. Keep it equal to the rank unless you know why.",
        group="basic", ref="as in PEFT; lora-over.txt Eq. 2", above=0)
    target_modules: tuple[str, ...] = option(
        default_factory=lambda: DEFAULT_TARGETS, help="Which layers get an adapter: endings of their names "
        "(to_q, to_k, to_v, to_out.0 are the attention projections).", label="target layers")
    options: dict[str, Any] = field(default_factory=dict)
    """The chosen method's and every other registered method's own settings, by name (defaults filled in)."""

    def __init__(self, method: str = "lora", rank: int = 4, alpha: float = 4.0,
                 target_modules: tuple[str, ...] = DEFAULT_TARGETS, options: dict[str, Any] | None = None,
                 **method_options: Any) -> None:
        self.method, self.rank, self.alpha = method, rank, alpha
        self.target_modules = tuple(target_modules)
        self.options = {**(options or {}), **method_options}
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not self.target_modules:
            raise ValueError("target_modules is empty: name at least one module suffix, e.g. to_q")
        for s in self.settings():
            if s.name in ("rank", "alpha"):
                s.check(getattr(self, s.name))
        known = method_settings()
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise ValueError(f"unknown adapter setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        self.options = {name: s.convert(self.options[name]) if name in self.options else s.default
                        for name, s in known.items()}

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__} has no setting {name!r}")

    @classmethod
    def settings(cls) -> list[Setting]:
        """The fields' settings (the method's choices from the registry) and every method's own settings."""
        out = []
        for s in super().settings():
            if s.name == "method":
                s = replace(s, choices=tuple(METHODS), choice_help=tuple(m.summary for m in METHODS.values()))
            out.append(s)
        return out

    @classmethod
    def extra_settings(cls) -> list[Setting]:
        return list(method_settings().values())

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> AdapterConfig:
        """Rebuild the config a run saved (`to_dict`): a method setting newer than the run gets its `absent` value,
        what the run was trained with (see `Setting.absent`)."""
        absent = {s.name: s.absent for s in method_settings().values() if s.absent is not None and s.name not in values}
        return cls.from_dict({**absent, **values})

    @classmethod
    def _build(cls, values: dict[str, Any]) -> AdapterConfig:
        fixed = {k: values[k] for k in ("method", "rank", "alpha", "target_modules") if k in values}
        return cls(**fixed, options={k: v for k, v in values.items() if k not in fixed})

    def to_dict(self) -> dict[str, Any]:
        """Return the flat settings: method, rank, alpha, target_modules and every method setting."""
        return {**super().to_dict(), **plain_value(self.options)}
