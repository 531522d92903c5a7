"""Saving and restoring everything a run needs to continue: adapter parameters and opdiff's own state."""

from __future__ import annotations

import torch
from torch import nn

from opdiff.methods.lora_over_select import selector


def training_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return every trainable parameter (uncollapsed: MLPs, cores, ...) and opdiff's buffers (selection state)."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if hasattr(model, "opdiff"):
        state.update({f"opdiff.{n}": b.detach() for n, b in model.opdiff.named_buffers()})
    return state


def load_training_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `training_state_dict` into a freshly injected model (same config), in place.

    Matrices that a selection had turned into MPO are turned into MPO again first, so the cores have a place.
    Build the optimizer after this call. Raises ValueError naming missing or unexpected keys.
    """
    sel = selector(model)
    if sel is not None:
        for name, buf in sel.named_buffers():
            key = f"opdiff.select.{name}"
            if key not in state:
                raise ValueError(f"checkpoint lacks the selection state {key!r}")
            buf.copy_(state[key])
        sel.restore(model)
    expected = training_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match this adapter: missing {missing[:5]}, unexpected {unexpected[:5]}"
                         f" ({len(missing)} missing, {len(unexpected)} unexpected)")
    with torch.no_grad():
        for key, target in expected.items():
            if target.shape != state[key].shape:
                raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(state[key])
