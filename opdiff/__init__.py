"""opdiff: over-parameterized low-rank adapters for any torch model; train big, ship a plain LoRA.

    config = AdapterConfig(method="op-lora", rank=4)
    inject(model, config)                      # PEFT LoRA layers + the method's reparameterization
    opt = torch.optim.AdamW(param_groups(model, lr=1e-4))
    with materialize(model):                   # A, B generated once for this step
        loss = ...; loss.backward()
    opt.step()
    # every step, the method's hooks: see opdiff.methods.base (method_of(model).after_backward(...), ...)
    collapse(model)                            # plain PEFT LoRA/DoRA weights, nothing else
"""

from opdiff.config import DEFAULT_TARGETS, AdapterConfig
from opdiff.inject import ADAPTER_NAME, adapted_layers, inject, param_groups, remove
from opdiff.methods import METHODS, Method, method_of, register, unregister
from opdiff.methods.base import trainable_parameters
from opdiff.reparam import collapse, materialize
from opdiff.state import load_training_state_dict, training_state_dict

__all__ = [
    "ADAPTER_NAME",
    "DEFAULT_TARGETS",
    "METHODS",
    "AdapterConfig",
    "Method",
    "adapted_layers",
    "collapse",
    "inject",
    "load_training_state_dict",
    "materialize",
    "param_groups",
    "remove",
    "method_of",
    "register",
    "unregister",
    "trainable_parameters",
    "training_state_dict",
]
__version__ = "0.1.0"
