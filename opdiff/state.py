"""Saving and restoring everything a run needs to continue: adapter parameters and opdiff's own state."""

from __future__ import annotations

import torch
from torch import nn

from opdiff.methods import method_of


def training_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return every trainable parameter (uncollapsed: MLPs, cores, ...) and opdiff's buffers (selection state)."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if hasattr(model, "opdiff"):
        state.update({f"opdiff.{n}": b.detach() for n, b in model.opdiff.named_buffers()})
    return state


def load_training_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `training_state_dict` into a freshly injected model (same config), in place.

    The method first rebuilds any structure its saved state describes (`Method.before_load`: e.g. matrices a
    selection had given MPO cores get them again), so every tensor has a place. Build the optimizer after this
    call. Raises ValueError naming missing or unexpected keys.
    """
    method_of(model).before_load(model, state)
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
