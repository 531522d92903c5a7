"""DoRA in the kohya key layout, once per loader family: no single `dora_scale` is read right everywhere.

A collapsed DoRA layer is W = m * W' / ||W'||_row with W' = W0 + s B A, s = alpha / r and m of shape (d_out,)
(PEFT's `DoraLinearLayer`; opdiff.inject.DoraLayer). Loaders read a kohya `dora_scale` of shape (d_out, 1) as:

- LyCORIS (`lycoris/functional/general.py` `weight_decompose`, wd_on_out): W = dora_scale * W' / (||W'||_row + eps).
  That is PEFT's formula, so `dora_scale = m` (`lycoris_tensors`, which is `export.kohya_tensors`).
- ComfyUI (`comfy/weight_adapter/base.py` `weight_decompose`) and Forge, which copies it
  (`backend/patcher/lora.py`): when `dora_scale.shape[0] == d_out` they divide by the *base* row norm,
  W = dora_scale * W' / (||W0||_row + eps), computed in float32. `comfyui_scale` returns the magnitude that makes
  this W equal DoRA's: dora_scale = m * (||W0||_row + eps) / ||W'||_row. It holds for the base it was trained on.
- AUTOMATIC1111 (`extensions-builtin/Lora/network.py` `apply_weight_decompose`) always divides by column norms
  (1, d_in), and diffusers' kohya converter drops `dora_scale`: no magnitude can be right there. For them
  `svd_lora` writes a plain LoRA whose up @ down is the best rank-R approximation (truncated SVD, Eckart-Young)
  of the whole DoRA update W - W0, with the error it leaves measured.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

import opdiff

# ComfyUI patches weights in float32 (`intermediate_dtype`) and adds this to the row norm.
COMFYUI_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class DoraLayer:
    """One collapsed DoRA layer, float32 on its model's device."""

    name: str
    """Module path in the U-Net, e.g. `mid_block.attentions.0.transformer_blocks.0.attn1.to_q`."""
    base: torch.Tensor  # W0 (d_out, d_in)
    down: torch.Tensor  # A (r, d_in)
    up: torch.Tensor  # B (d_out, r)
    scale: float  # s = alpha / r
    magnitude: torch.Tensor  # m (d_out,)

    def adapted(self) -> torch.Tensor:
        """Return W' = W0 + s B A, shape (d_out, d_in)."""
        return self.base + self.scale * self.up @ self.down

    def weight(self) -> torch.Tensor:
        """Return the trained weight W = m * W' / ||W'||_row, shape (d_out, d_in)."""
        adapted = self.adapted()
        return adapted * (self.magnitude / adapted.norm(dim=1))[:, None]


def dora_layers(unet: nn.Module) -> Iterator[DoraLayer]:
    """Yield the collapsed DoRA layers of `unet` in module order, one at a time (on the full SDXL U-Net, float32
    copies of every base weight at once would be gigabytes).

    Raises ValueError when the adapter is not DoRA (its layers have no magnitude).
    """
    config: opdiff.AdapterConfig = unet.opdiff_config
    for a in opdiff.adapted_layers(unet):
        if a.magnitude is None:
            raise ValueError(f"{a.name} has no DoRA magnitude: method {config.method!r} is not a DoRA method")
        yield DoraLayer(
            name=a.name,
            base=a.layer.base_layer.weight.detach().float(),
            down=a.lora_A.weight.detach().float(),
            up=a.lora_B.weight.detach().float(),
            scale=float(a.layer.scaling[opdiff.ADAPTER_NAME]),
            magnitude=a.magnitude.weight.detach().float(),
        )


@torch.no_grad()
def comfyui_scale(layer: DoraLayer) -> torch.Tensor:
    """Return the `dora_scale` (d_out, 1) with which ComfyUI's output-axis formula gives DoRA's weight:
    m * (||W0||_row + eps) / ||W'||_row."""
    base_norm = layer.base.norm(dim=1) + COMFYUI_EPS  # (d_out,)
    return (layer.magnitude * base_norm / layer.adapted().norm(dim=1))[:, None]


@dataclass(frozen=True)
class SvdLora:
    """A plain LoRA approximating one DoRA layer: W0 + alpha / rank * up @ down ~ W."""

    down: torch.Tensor  # (rank, d_in)
    up: torch.Tensor  # (d_out, rank)
    alpha: float
    error: float
    """||W - W0 - alpha / rank * up @ down||_F / ||W - W0||_F, measured on the tensors as stored (after the dtype cast)."""
    update_norm: float  # ||W - W0||_F
    residual_norm: float  # ||W - W0 - alpha / rank * up @ down||_F


OVERSAMPLE = 16  # extra directions in the randomized range finder (Halko, Martinsson & Tropp 2011, Sec. 4.2)
POWER_ITERATIONS = 4  # subspace iterations (Alg. 4.4): each sharpens the captured directions by s_R+17 / s_R


@torch.no_grad()
def svd_lora(layer: DoraLayer, rank: int, dtype: torch.dtype = torch.float32) -> SvdLora:
    """Return a rank-`rank` plain LoRA close (Frobenius) to the DoRA update W - W0, stored in `dtype`.

    The update diag(m / ||W'||_row - 1) W0 + diag(m / ||W'||_row) s B A is full rank in general. Its top singular
    triplets come from `top_singular` (an exact SVD for small layers, a seeded randomized one for large); they are
    split evenly (up = U sqrt(S), down = sqrt(S) V^T) so neither factor is far from 1 in magnitude, with
    alpha = rank (scale 1). A rank of at least min(d_out, d_in) is capped there and is exact. The error is
    measured on the factors as stored, so it is the file's own.
    """
    if rank < 1:
        raise ValueError(f"svd_rank must be at least 1, got {rank}")
    delta = layer.weight() - layer.base  # (d_out, d_in)
    rank = min(rank, *delta.shape)
    u, s, vh = top_singular(delta, rank)
    root = s.sqrt()
    up = (u * root).to(dtype).contiguous()  # (d_out, R)
    down = (root[:, None] * vh).to(dtype).contiguous()  # (R, d_in)
    exact = delta.double()
    residual = (exact - up.double() @ down.double()).norm().item()
    total = exact.norm().item()
    return SvdLora(down, up, float(rank), residual / total if total > 0 else 0.0, total, residual)


def top_singular(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the `rank` leading singular triplets of `matrix` (m, n): U (m, R), S (R,), V^T (R, n).

    Exact (float64 SVD) when rank + OVERSAMPLE covers the smaller side; otherwise randomized subspace iteration
    (Halko, Martinsson & Tropp 2011, Alg. 4.4 then 5.1) from a fixed seed, float32 on the matrix's device: on the
    full SDXL U-Net a dense SVD of every 1280 x 2048 update takes minutes on a CPU, this takes seconds.
    """
    m, n = matrix.shape
    q = rank + OVERSAMPLE
    if q >= min(m, n):
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u[:, :rank].float(), s[:rank].float(), vh[:rank].float()
    a = matrix.float()
    generator = torch.Generator(device=a.device).manual_seed(0)  # equal files for equal runs
    basis, _ = torch.linalg.qr(a @ torch.randn(n, q, generator=generator, device=a.device))  # (m, q)
    for _ in range(POWER_ITERATIONS):  # re-orthonormalize between products, or float32 loses the small directions
        side, _ = torch.linalg.qr(a.T @ basis)  # (n, q)
        basis, _ = torch.linalg.qr(a @ side)  # (m, q)
    u_small, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)  # (q, q), (q,), (q, n)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]
