"""Plain LoRA and DoRA: PEFT's layers as they are (A kaiming-uniform, B zero; DoRA adds the magnitude m)."""

from __future__ import annotations

from opdiff.methods.base import Method, register

register(Method(
    "lora", "LoRA: train A and B directly.",
    about="Plain LoRA: the update B A is trained directly. The baseline every other method is compared with, "
          "and the fastest per step (on SDXL at rank 4: 5.8 M trainable parameters).",
    ref="LoRA (Hu et al. 2021); lora-over.txt Eq. 2",
))
register(Method(
    "dora", "DoRA: LoRA plus a learned magnitude per output.", use_dora=True,
    about="DoRA: LoRA's direction plus a learned magnitude per output channel. Often a little better than LoRA at "
          "the same rank, at about 1.2x LoRA's time per step and 0.4 GB more memory on SDXL; exports carry the "
          "magnitude, which some programs read differently.",
    ref="DoRA (Liu et al. 2024); op-lora.txt Sec. 3.1",
))
