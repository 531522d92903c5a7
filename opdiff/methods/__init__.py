"""The method registry: one entry per method, one file per method family.

Adding a method = one file that builds its reparameterization + one `register(...)` line.
Every method starts from PEFT LoRA (or DoRA) layers; `attach` then replaces some of their tensors by functions
of new parameters (see `opdiff.reparam`), so PEFT's forward, scaling and DoRA math stay untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from opdiff.config import AdapterConfig
    from opdiff.inject import AdaptedLayer


@dataclass(frozen=True)
class Method:
    """A registered adapter method."""

    name: str
    use_dora: bool
    """Whether the PEFT base layer is DoRA (learned magnitude) rather than LoRA."""
    attach: Callable[[nn.Module, list[AdaptedLayer], AdapterConfig], None]
    """Reparameterize the freshly injected PEFT layers in place (no-op for plain LoRA/DoRA)."""
    summary: str
    """One line for `--help` and the GUI."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry and return it."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


# Registration happens on import; the order here is the order users see.
from opdiff.methods import lora, op, lora_over, lora_over_select  # noqa: E402, F401, I001
