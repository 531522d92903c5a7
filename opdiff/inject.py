"""Put PEFT LoRA/DoRA layers on a model's target `nn.Linear` modules, then attach the chosen method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.dora import DoraLinearLayer
from peft.utils.integrations import dequantize_module_weight
from peft.utils.other import transpose
from torch import nn
from torch.nn import functional as F

from opdiff.config import AdapterConfig
from opdiff.methods import METHODS, method_of

ADAPTER_NAME = "default"
LAYERS_ATTRIBUTE = "_opdiff_layers"  # a plain attribute: the list `inject` found, not registered submodules


@dataclass(frozen=True)
class AdaptedLayer:
    """One PEFT LoRA layer and the tensors a method may reparameterize."""

    name: str
    """Module path in the model, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`."""
    layer: LoraLayer

    @property
    def lora_A(self) -> nn.Linear:  # weight (r, d_in)
        return self.layer.lora_A[ADAPTER_NAME]

    @property
    def lora_B(self) -> nn.Linear:  # weight (d_out, r)
        return self.layer.lora_B[ADAPTER_NAME]

    @property
    def magnitude(self) -> nn.Module | None:  # DoRA only: weight (d_out,)
        mags = self.layer.lora_magnitude_vector
        return mags[ADAPTER_NAME] if ADAPTER_NAME in mags else None

    @property
    def kind(self) -> str:
        """The target suffix this layer matched (`to_q`, `to_out.0`, ...): the selection group of lora-over.txt Sec. 4.3."""
        return self.layer.opdiff_kind


class DoraLayer(DoraLinearLayer):
    """PEFT's DoRA magnitude layer, same math, without a full-size temporary per layer per step.

    DoRA scales the adapted weight per output row: W = m * (W0 + s B A) / ||W0 + s B A||_row, the norm detached
    (DoRA Sec. 4.3; PEFT `DoraLinearLayer.forward`). PEFT forms the (d_out, d_in) matrices B A and W0 + s B A for
    every layer at every step, and builds B A as `lora_B(lora_A(eye(d_in)))` with autograd on, which keeps a
    (d_in, d_in) identity per layer alive until backward. On the full SDXL U-Net that is gigabytes of temporaries
    per step (on CPU they fragment the heap: 13 GB of peak memory above the weights at 128 px, bench/methods.py).

    Here the norm comes from the expansion ||W0 + s B A||^2_row = ||W0||^2_row + 2 s <B, W0 A^T>_row
    + s^2 <B, B (A A^T)>_row: one (d_out, d_in) x (d_in, r) product, nothing of size d_out x d_in.
    ||W0||_row is computed once (the base is frozen) and recomputed if the base weight changes.
    Outputs and gradients equal PEFT's (tests/test_methods.py).
    """

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        weight = dequantize_module_weight(base_layer).to(x.dtype)
        weight_norm = self.row_norm(weight, lora_A.weight, lora_B.weight, scaling).to(x.dtype)  # detached
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            if base_layer.bias is not None:
                base_result = base_result - base_layer.bias
        else:
            base_result = F.linear(x, transpose(weight, self.fan_in_fan_out))
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    @torch.no_grad()
    def row_norm(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """||W0 + s B A|| of every output row, shape (d_out,), in float32 or the base's wider dtype; W0 (d_out, d_in),
        A (r, d_in), B (d_out, r)."""
        weight = transpose(weight, self.fan_in_fan_out)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        acc = torch.promote_types(weight.dtype, torch.float32)  # float32 at least: 16-bit bases accumulate in it
        if getattr(self, "_base_key", None) != key:
            self._base_sq = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()
            self._base_key = key
        a, b = a.to(acc), b.to(acc)
        cross = (b * (weight @ a.to(weight.dtype).T).to(acc)).sum(dim=1)  # <B, W0 A^T> per row
        lora_sq = (b * (b @ (a @ a.T))).sum(dim=1)  # ||B A||^2 per row
        return (self._base_sq + 2 * scaling * cross + scaling**2 * lora_sq).clamp_min(0).sqrt()


def adapted_layers(model: nn.Module) -> list[AdaptedLayer]:
    """Return the model's PEFT LoRA layers in module order.

    `inject` keeps the list on the model (the layers never change until `remove`): walking a full SDXL U-Net's
    modules costs milliseconds, and training reads this list every step.
    """
    known = model.__dict__.get(LAYERS_ATTRIBUTE)
    if known is not None:
        return list(known)
    return [AdaptedLayer(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Adapt every `nn.Linear` whose name ends with one of `config.target_modules`, in place.

    Freezes every base parameter, adds PEFT LoRA (or DoRA) layers with scaling alpha / rank, and attaches the
    method's reparameterization. At this point the model's output equals the base model's (B = 0).
    Returns the model.
    """
    if getattr(model, "opdiff_config", None) is not None:
        raise ValueError("this model already carries an opdiff adapter; collapse/export it or load a fresh base")
    method = METHODS[config.method]
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        use_dora=method.use_dora,
        lora_dropout=0.0,
        init_lora_weights=True,  # PEFT's init: A kaiming-uniform, B zero
    )
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER_NAME)
    except ValueError as e:  # PEFT says "Target modules ... not found"; name ours and the setting to change
        raise ValueError(f"no module matches target_modules={list(config.target_modules)}: {e}") from e
    layers = adapted_layers(model)
    model.__dict__[LAYERS_ATTRIBUTE] = tuple(layers)
    for a in layers:
        if a.magnitude is not None and type(a.magnitude) is DoraLinearLayer:
            a.magnitude.__class__ = DoraLayer
        a.layer.opdiff_kind = next(t for t in config.target_modules if a.name == t or a.name.endswith("." + t))
    model.opdiff = nn.ModuleDict()  # training-only state shared across layers (e.g. OP generators); collapse drops it
    method.attach(model, layers, config)
    model.opdiff_config = config
    return model


def remove(model: nn.Module) -> nn.Module:
    """Take the adapter off again, in place: every adapted layer becomes its original `nn.Linear`.

    Returns the model, equal to the base it was before `inject` (base weights were frozen, never changed) and ready
    for another `inject`. Useful to compare methods on one loaded base without loading it again.
    """
    for a in adapted_layers(model):
        parent_name, _, child = a.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, a.layer.get_base_layer())
    model.__dict__.pop(LAYERS_ATTRIBUTE, None)
    for attribute in ("opdiff", "opdiff_config", "peft_config"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


def param_groups(model: nn.Module, lr: float, relative: bool = False) -> list[dict]:
    """Return the optimizer parameter groups the injected method asks for (`Method.param_groups`; `relative`: lr
    multiplies a step size the optimizer finds itself, as Prodigy's does)."""
    return method_of(model).param_groups(model, lr, relative)
