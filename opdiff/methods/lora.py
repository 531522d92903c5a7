"""Plain LoRA and DoRA: PEFT's layers as they are (A kaiming-uniform, B zero; DoRA adds the magnitude m)."""

from __future__ import annotations

from opdiff.methods import Method, register


def _nothing_to_attach(model, layers, config) -> None:
    """LoRA and DoRA train PEFT's own tensors directly."""


register(Method("lora", use_dora=False, attach=_nothing_to_attach, summary="LoRA: train A and B directly."))
register(Method("dora", use_dora=True, attach=_nothing_to_attach, summary="DoRA: LoRA plus a learned magnitude per output."))
