"""The optimizers a run may use, and the checks that refuse an unusable one before any work starts.

AdamW is the papers' optimizer and the default. Prodigy (`prodigyopt`) estimates its own step size, so its lr is
a multiplier around 1.0. 8-bit AdamW (`bitsandbytes`) keeps both moments in 8 bits per value, a quarter of
AdamW's state. Both live in optional extras; the core never imports them.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

import torch

from pipelines.step import adamw

log = logging.getLogger(__name__)

# optimizer -> (module it needs, opdiff extra that installs it)
NEEDS = {"adamw8bit": ("bitsandbytes", "bnb8bit"), "prodigy": ("prodigyopt", "prodigy")}
BNB_KERNEL = "bitsandbytes::optimizer_update_8bit_blockwise"
# Bytes of optimizer state per trainable parameter (float32 parameters): AdamW's two moments; 8-bit AdamW's two
# moments in one byte each plus a float32 scale per block of 256 values; Prodigy's two moments, its running
# sum s and the initial weights p0.
RELATIVE_LR = {"prodigy"}  # optimizers whose lr multiplies a step size they find themselves
STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8.0 / 256, "prodigy": 16.0}
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors


def check_optimizer(name: str, device: str) -> None:
    """Raise ValueError naming the `optimizer` setting when its package is missing or cannot run on `device`."""
    if name in NEEDS:
        module, extra = NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"optimizer {name} needs the {module} package: pip install 'opdiff[{extra}]' (or "
                             "choose --optimizer adamw)")
    if name == "adamw8bit" and not _bnb_runs_on(torch.device(device).type):
        import bitsandbytes

        raise ValueError(f"optimizer adamw8bit: bitsandbytes {bitsandbytes.__version__} has no 8-bit optimizer for "
                         f"{torch.device(device).type} devices here; choose --optimizer adamw (or prodigy)")


def _bnb_runs_on(device_type: str) -> bool:
    """Whether bitsandbytes registered its 8-bit optimizer kernel for `device_type` (it does so per backend it
    could load, e.g. cuda only where the CUDA library loaded)."""
    import bitsandbytes  # noqa: F401 - registers its kernels

    try:
        key = torch._C._dispatch_key_for_device(device_type)
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(BNB_KERNEL, key))
    except (AttributeError, RuntimeError):  # a torch without these internals: let the first step tell
        return True


def build_optimizer(name: str, groups: list[dict], weight_decay: float, warmup_steps: int = 0
                    ) -> torch.optim.Optimizer:
    """Return optimizer `name` over the parameter `groups` (each keeps its own lr, as the method asked).

    Prodigy takes one learning rate for all groups (its step-size estimate is shared), so groups at different
    rates are refused by name; with warm-up it runs with `safeguard_warmup`, as its authors advise.
    """
    if name == "adamw":
        return adamw(groups, weight_decay)
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay, min_8bit_size=BNB_MIN_8BIT_SIZE)
    if name == "prodigy":
        from prodigyopt import Prodigy

        rates = {g.get("name", str(i)): g["lr"] for i, g in enumerate(groups)}
        if len(set(rates.values())) > 1:
            raise ValueError(f"optimizer prodigy takes one learning rate for every parameter group, but the method "
                             f"asks for {rates}: leave the method's own learning rate empty, or choose adamw")
        if max(rates.values()) < 0.1:
            log.warning("optimizer prodigy with lr %g: Prodigy finds the step size itself and expects lr near 1.0",
                        max(rates.values()))
        return Prodigy(groups, weight_decay=weight_decay, decouple=True, use_bias_correction=True,
                       safeguard_warmup=warmup_steps > 0)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: adamw, {', '.join(NEEDS)}")


def state_bytes(name: str, params: list[torch.Tensor]) -> int:
    """Bytes of optimizer state `name` keeps for `params` (float32 trainable tensors) once it has stepped."""
    total = 0.0
    for p in params:
        per_value = STATE_BYTES[name]
        if name == "adamw8bit" and p.numel() < BNB_MIN_8BIT_SIZE:
            per_value = STATE_BYTES["adamw"]
        total += per_value * p.numel()
    return int(total)
