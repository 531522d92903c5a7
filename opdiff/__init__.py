"""opdiff: over-parameterized low-rank adapters for any torch model; train big, ship a plain LoRA.

    config = AdapterConfig(method="op-lora", rank=4)
    inject(model, config)                      # PEFT LoRA layers + the method's reparameterization
    opt = torch.optim.AdamW(param_groups(model, lr=1e-4))
    with materialize(model):                   # A, B generated once for this step
        loss = ...; loss.backward()
    opt.step()
    # lora-over-mpop/-mpor only: selector(model).observe(model) after backward, .step(...) after opt.step()
    collapse(model)                            # plain PEFT LoRA/DoRA weights, nothing else
"""

from opdiff.config import DEFAULT_TARGETS, AdapterConfig
from opdiff.inject import ADAPTER_NAME, adapted_layers, inject, param_groups, remove, trainable_parameters
from opdiff.methods import METHODS
from opdiff.methods.lora_over_select import selector
from opdiff.reparam import collapse, materialize
from opdiff.state import load_training_state_dict, training_state_dict

__all__ = [
    "ADAPTER_NAME",
    "DEFAULT_TARGETS",
    "METHODS",
    "AdapterConfig",
    "adapted_layers",
    "collapse",
    "inject",
    "load_training_state_dict",
    "materialize",
    "param_groups",
    "remove",
    "selector",
    "trainable_parameters",
    "training_state_dict",
]
__version__ = "0.1.0"
