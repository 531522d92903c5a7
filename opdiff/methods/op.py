"""OP-LoRA and OP-DoRA (op-lora.txt Sec. 3.1, Eq. 4; Appendix C.1): A and B are predicted by a small MLP.

    [vec(A); vec(B)] = W2 ReLU(W1 z + c1) + c2                                  (op-lora.txt Eq. 4)

One MLP per adapted layer, as in the paper (it reports that sharing the MLP across layers performs badly). The MLPs of
all layers with the same (r, d_in, d_out) are stored stacked and evaluated in one batched matmul per step, which is
mathematically the same as separate MLPs (AdamW is elementwise). OP-DoRA adds a second head for the DoRA magnitude m.
The MLPs exist only while training; collapse keeps only the A, B (and m) they produce.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from opdiff.methods.base import Method, register
from opdiff.reparam import Part, StepCached, reparameterize
from opdiff.settings import Setting

if TYPE_CHECKING:
    from opdiff.config import AdapterConfig
    from opdiff.inject import AdaptedLayer


def _kaiming_uniform_stack(n: int, rows: int, fan_in: int) -> torch.Tensor:
    """n independent matrices (rows x fan_in) with nn.Linear's default init (kaiming uniform, a = sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(n, rows, fan_in).uniform_(-bound, bound)


class OPGenerator(StepCached):
    """L two-layer MLPs (Eq. 4) for L layers of one shape, evaluated together.

    Init (Appendix C.1): W1, W2 kaiming uniform, biases zero, the rows of W2 that produce B zero, so B = 0 and the
    adapted model equals the base at step 0. z ~ N(0, z_std^2), z_std = 1 by default: the paper learns z but does
    not give its init; a zero z would make ReLU(W1 z) = 0 and block every gradient to W1. At init
    std(A) = z_std / sqrt(18) (W1 z has variance z_std^2 / 3, half of it survives the ReLU, W2 divides by 3), so
    z_std = sqrt(6 / d_in) starts A at the std of PEFT's kaiming-uniform A, 1 / sqrt(3 d_in).
    """

    def __init__(self, n_layers: int, rank: int, d_in: int, d_out: int, width: int, embed_dim: int,
                 magnitudes: torch.Tensor | None = None, z_std: float = 1.0) -> None:
        super().__init__()
        self.rank, self.d_in, self.d_out = rank, d_in, d_out
        n_a, n_b = rank * d_in, d_out * rank
        self.z = nn.Parameter(z_std * torch.randn(n_layers, embed_dim))  # (L, e)
        self.w1 = nn.Parameter(_kaiming_uniform_stack(n_layers, width, embed_dim))  # (L, h, e)
        self.c1 = nn.Parameter(torch.zeros(n_layers, width))  # (L, h)
        w2 = _kaiming_uniform_stack(n_layers, n_a + n_b, width)  # (L, r*d_in + d_out*r, h)
        w2[:, n_a:] = 0.0  # the B head starts at zero (Appendix C.1)
        self.w2 = nn.Parameter(w2)
        self.c2 = nn.Parameter(torch.zeros(n_layers, n_a + n_b))  # (L, r*d_in + d_out*r)
        if magnitudes is not None:
            # OP-DoRA's second head: W2m zero and c2m = PEFT's initial magnitude ||W0 + scale*BA|| = ||W0||, so m
            # starts where DoRA starts and the model is unchanged at step 0.
            self.w2_m = nn.Parameter(torch.zeros(n_layers, d_out, width))  # (L, d_out, h)
            self.c2_m = nn.Parameter(magnitudes.detach().clone())  # (L, d_out)
        else:
            self.w2_m = self.c2_m = None

    def compute(self) -> dict[str, torch.Tensor]:
        """Return {"A": (L, r, d_in), "B": (L, d_out, r)} and, for OP-DoRA, {"m": (L, d_out)}."""
        hidden = torch.relu(torch.baddbmm(self.c1.unsqueeze(-1), self.w1, self.z.unsqueeze(-1)))  # (L, h, 1)
        out = torch.baddbmm(self.c2.unsqueeze(-1), self.w2, hidden).squeeze(-1)  # (L, r*d_in + d_out*r)
        n = out.shape[0]
        n_a = self.rank * self.d_in
        result = {
            "A": out[:, :n_a].reshape(n, self.rank, self.d_in),
            "B": out[:, n_a:].reshape(n, self.d_out, self.rank),
        }
        if self.w2_m is not None:
            result["m"] = torch.baddbmm(self.c2_m.unsqueeze(-1), self.w2_m, hidden).squeeze(-1)  # (L, d_out)
        return result


OP_WIDTH = Setting(
    "op_width", int, 32, "Hidden width of the small network that predicts each layer's adapter while training. "
    "Wider trains more parameters; it does not change the exported file.",
    ref="op-lora.txt Sec. 4.1 and Table 8: 32 for SDXL", label="generator width", minimum=1)
OP_EMBED_DIM = Setting(
    "op_embed_dim", int, 128, "Size of the learned input vector of each layer's generator network.",
    ref="op-lora.txt App. B.2", label="generator input size", minimum=1)


class OverParameterized(Method):
    """OP-LoRA / OP-DoRA: every layer's A, B (and DoRA m) is its MLP's output (Eq. 4)."""

    def attach(self, model: nn.Module, layers: list[AdaptedLayer], config: AdapterConfig) -> None:
        """Replace every layer's A, B (and DoRA m) by its MLP's output; layers of one shape share one batched call."""
        by_shape: dict[tuple[int, int, int], list[AdaptedLayer]] = defaultdict(list)
        for a in layers:
            r, d_in = a.lora_A.weight.shape
            by_shape[(r, d_in, a.lora_B.weight.shape[0])].append(a)
        for (r, d_in, d_out), group in by_shape.items():
            ref = group[0].lora_A.weight
            magnitudes = None
            if group[0].magnitude is not None:
                magnitudes = torch.stack([a.magnitude.weight.detach() for a in group])  # (L, d_out)
            gen = OPGenerator(len(group), r, d_in, d_out, config.op_width, config.op_embed_dim, magnitudes)
            gen.to(device=ref.device, dtype=ref.dtype)
            model.opdiff[f"op_{r}x{d_in}x{d_out}"] = gen
            for i, a in enumerate(group):
                reparameterize(a.lora_A, "weight", Part(gen, "A", i))
                reparameterize(a.lora_B, "weight", Part(gen, "B", i))
                if magnitudes is not None:
                    reparameterize(a.magnitude, "weight", Part(gen, "m", i))


register(OverParameterized(
    "op-lora", "OP-LoRA: A and B predicted by a per-layer MLP while training; ships as plain LoRA.",
    settings=(OP_WIDTH, OP_EMBED_DIM),
    about="OP-LoRA: while training, a small network per layer predicts A and B; the network is dropped at export, "
          "so the file is an ordinary LoRA. Trains more stably across learning rates than LoRA; costs about 1.2 to "
          "1.4x LoRA's time per step and 2.8 GB more memory on SDXL (194 M parameters while training).",
    ref="op-lora.txt Sec. 3.1, Eq. 4",
))
register(OverParameterized(
    "op-dora", "OP-DoRA: OP-LoRA plus a second MLP head for the DoRA magnitude; ships as plain DoRA.", use_dora=True,
    settings=(OP_WIDTH, OP_EMBED_DIM),
    about="OP-DoRA: OP-LoRA with DoRA's learned magnitude, predicted by a second output of the same network. "
          "Costs about 1.4x LoRA's time per step and 3.5 GB more memory on SDXL. Ships as a DoRA file.",
    ref="op-lora.txt Sec. 3.1",
))
