"""The method protocol and the registry: what a training loop may ask of any adapter method.

A method is a `Method` (or a subclass overriding some hooks) and one `register(...)` line. Every method starts
from PEFT LoRA (or DoRA) layers; `attach` may replace some of their tensors by functions of new parameters (see
`opdiff.reparam`), so PEFT's forward, scaling and DoRA math stay untouched. The loop calls the hooks of whatever
method is injected (`method_of(model)`) and never names one:

    groups = method.param_groups(model, lr)          # optimizer parameter groups
    warning = method.schedule_warning(config, total)   # before training: can its schedule finish?
    events = method.before_training(model, optimizer, probe_loss)   # once, before the first step of a new run
    ... loss.backward()
    method.after_backward(model, step)                # unscaled gradients are in .grad
    optimizer.step()
    events = method.after_step(model, step, optimizer, probe_loss)   # may restructure the model
    method.report(model)                              # numbers worth logging (e.g. parameters added)

Per-model state lives in buffers under `model.opdiff`, so checkpoints carry it; `before_load` rebuilds any
structure those buffers describe before a checkpoint's parameters are loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opdiff.settings import Setting

if TYPE_CHECKING:
    from opdiff.config import AdapterConfig
    from opdiff.inject import AdaptedLayer

ProbeLoss = Callable[[int], float]
"""`probe_loss(n)`: the mean loss on the first n of a fixed set of batches (fixed noise and timesteps) under the
current weights, without gradients; what Eq. 7 of lora-over.txt measures."""


class Method:
    """An adapter method: plain PEFT LoRA (or DoRA with `use_dora`) unless a subclass overrides the hooks."""

    def __init__(self, name: str, summary: str, *, use_dora: bool = False, settings: tuple[Setting, ...] = (),
                 about: str = "", ref: str = "") -> None:
        self.name = name
        self.summary = summary
        """One line for `--help` and the GUI's method list."""
        self.use_dora = use_dora
        """Whether the PEFT base layer is DoRA (learned magnitude) rather than LoRA."""
        self.settings = tuple(settings)
        """The method's own settings (beyond rank, alpha and targets), declared once in its file."""
        self.about = about or summary
        """A plain paragraph for the GUI: what the method does and when to pick it."""
        self.ref = ref
        """The paper section it implements."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- building

    def attach(self, model: nn.Module, layers: list[AdaptedLayer], config: AdapterConfig) -> None:
        """Reparameterize the freshly injected PEFT layers in place (plain LoRA/DoRA: nothing to do)."""

    # -- hooks the training loop calls

    def param_groups(self, model: nn.Module, lr: float, relative: bool = False) -> list[dict]:
        """Return the optimizer's parameter groups: one "adapter" group at `lr` by default.

        `relative`: `lr` is a multiplier of a step size the optimizer finds itself (Prodigy), so rates a method
        derives from an absolute lr (e.g. a limit on its cores' rate) do not apply; rates the user set still do.
        """
        return [{"params": trainable_parameters(model), "lr": lr, "name": "adapter"}]

    def schedule_warning(self, config: AdapterConfig, total_steps: int) -> str | None:
        """Return why the method's schedule cannot finish within `total_steps` (naming the setting), or None."""
        return None

    def before_training(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        probe_loss: ProbeLoss) -> list[dict]:
        """Called once before the first step of a new run (not on resume); may restructure like `after_step`.

        Returns events worth showing the user; none by default.
        """
        return []

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called after the backward pass of optimizer step `step` (1-based), with unscaled gradients in `.grad`."""

    def after_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer,
                   probe_loss: ProbeLoss) -> list[dict]:
        """Called after optimizer step `step`; may change the model's structure and the optimizer's groups.

        Returns events worth showing the user (one dict each, e.g. a matrix given MPO cores); none by default.
        `probe_loss(n)` measures the loss on n fixed batches (built on first call).
        """
        return []

    events_title: str = ""
    """What the events of `after_step` are, for the GUI's table (empty: the method has none)."""

    def before_load(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Rebuild structure described by the method's saved buffers before a training state is loaded."""

    def at_largest(self, model: nn.Module) -> None:
        """Give `model` (freshly injected, e.g. on the meta device) the structure the method reaches at its largest
        while training, for memory estimates and benchmarks; nothing by default (the structure never changes)."""

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Return figures worth logging and keeping with the run (e.g. parameters added); none by default."""
        return {}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return every parameter the optimizer should update (adapter parameters only; the base stays frozen)."""
    return [p for p in model.parameters() if p.requires_grad]


METHODS: dict[str, Method] = {}
"""The registry, in the order users see: name -> Method."""


def register(method: Method) -> Method:
    """Add a method to the registry and return it.

    A setting may be shared by several methods (e.g. `op_width` by OP-LoRA and OP-DoRA) when they list the same
    description; two different descriptions under one name are refused.
    """
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    known = method_settings()
    for s in method.settings:
        other = known.get(s.name)
        if other is not None and (other.type, other.default, other.help) != (s.type, s.default, s.help):
            raise ValueError(f"method {method.name!r} declares setting {s.name!r} differently from "
                             f"{', '.join(other.read_by or ())}")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method from the registry (for methods registered at run time, e.g. in tests)."""
    del METHODS[name]


def method_settings() -> dict[str, Setting]:
    """Every registered method's own settings by name, each with `read_by` naming the methods that read it."""
    out: dict[str, Setting] = {}
    readers: dict[str, list[str]] = {}
    for method in METHODS.values():
        for s in method.settings:
            out.setdefault(s.name, s)
            readers.setdefault(s.name, []).append(method.name)
    return {name: replace(s, read_by=tuple(readers[name]), group="method") for name, s in out.items()}


def method_of(model: nn.Module) -> Method:
    """Return the method injected into `model`; ValueError if it carries no opdiff adapter."""
    config = getattr(model, "opdiff_config", None)
    if config is None:
        raise ValueError("this model carries no opdiff adapter: call opdiff.inject(model, config) first")
    return METHODS[config.method]
