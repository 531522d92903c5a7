"""The adapter methods: the protocol and registry (`base`), then one file per method family.

Adding a method = one file with a `Method` (or subclass) and its settings, plus one line below importing it.
The order of the imports is the order users see.
"""

# ruff: noqa: I001 - the family imports register in the order users see
from opdiff.methods.base import METHODS, Method, ProbeLoss, method_of, method_settings, register, unregister
from opdiff.methods import lora, op, lora_over, lora_over_select  # noqa: F401

__all__ = ["METHODS", "Method", "ProbeLoss", "method_of", "method_settings", "register", "unregister"]
