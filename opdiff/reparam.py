"""Replacing an adapter tensor by a function of new parameters, evaluating it once per step, and collapsing it.

A method turns e.g. `lora_A.weight` into `f(theta)` with `torch.nn.utils.parametrize`, so every consumer (PEFT's
forward, DoRA's norm, diffusers' sampling) reads the function's value as if it were the plain tensor.
Collapsing = evaluating every function once and storing the result as a plain parameter (minLoRA's "merge").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize


class StepCached(nn.Module):
    """A module whose output is shared by many parametrizations and must be computed once per step.

    Subclasses implement `compute()`, returning stacked tensors (L, ...), one slice per layer. `output()` hands
    them out unbound: a tuple of L views per key. Layers then take their slice from the tuple, so the backward
    pass stacks all L slice gradients in one op. Indexing the stacked tensor per layer instead makes each layer's
    backward allocate and fill a zero gradient of the whole stack: O(L^2) memory traffic, measured at 8 s of a
    15 s full-size SDXL step for OP-LoRA on CPU (bench/profile_step.py).

    Inside `materialize(model)` the first `output()` call computes and keeps the value until the context exits;
    outside it every call recomputes (correct, just slower).
    """

    def __init__(self) -> None:
        super().__init__()
        self._value = None
        self._caching = False

    def compute(self) -> dict[str, torch.Tensor]:
        """Return the shared value: {key: (L, ...) tensor} (implemented by subclasses)."""
        raise NotImplementedError

    def output(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Return {key: L per-layer views}: cached inside `materialize`, fresh outside it."""
        if not self._caching:
            return self._unbound()
        if self._value is None:
            self._value = self._unbound()
        return self._value

    def _unbound(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {key: value.unbind(0) for key, value in self.compute().items()}


class Part(nn.Module):
    """Parametrization that reads one tensor out of a `StepCached` source; the original tensor is ignored."""

    def __init__(self, source: StepCached, key: str, index: int) -> None:
        super().__init__()
        # Not a submodule: the source is owned once by the model (under `model.opdiff`), not by every layer.
        object.__setattr__(self, "source", source)
        self.key, self.index = key, index

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.source.output()[self.key][self.index]


def reparameterize(module: nn.Module, tensor_name: str, function: nn.Module) -> None:
    """Make `module.<tensor_name>` the output of `function` and freeze the original tensor.

    The original stays in place (its value is ignored) so PEFT's bookkeeping keeps working; it gets no gradient
    and is never handed to the optimizer.
    """
    parametrize.register_parametrization(module, tensor_name, function, unsafe=True)
    module.parametrizations[tensor_name].original.requires_grad_(False)


@contextmanager
def materialize(model: nn.Module) -> Iterator[None]:
    """Evaluate every reparameterized tensor once for the duration of the block (one training step).

    OP generators run one batched MLP per shape class on first use; MPO contractions run once per matrix
    (torch's `parametrize.cached`). Use around forward+backward, and around sampling.
    """
    owner = getattr(model, "opdiff", None)  # every StepCached source lives under `model.opdiff`
    sources = [m for m in owner.modules() if isinstance(m, StepCached)] if owner is not None else []
    for s in sources:
        s._caching, s._value = True, None
    try:
        with parametrize.cached():
            yield
    finally:
        for s in sources:
            s._caching, s._value = False, None


def collapse(model: nn.Module) -> nn.Module:
    """Bake every reparameterization into plain parameters, in place, and drop the training-only state.

    Returns the model, which then holds only PEFT LoRA/DoRA tensors (A, B, and m for DoRA), trainable as usual.
    """
    with torch.no_grad():
        for module in list(model.modules()):
            if not parametrize.is_parametrized(module):
                continue
            for name in list(module.parametrizations.keys()):
                value = getattr(module, name).detach().clone().contiguous()
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                module._parameters[name] = nn.Parameter(value, requires_grad=True)
    if hasattr(model, "opdiff"):
        del model.opdiff
    return model
