"""LoRA-Over (lora-over.txt Sec. 4.2): every LoRA matrix A (r x d_in) and B (d_out x r) trained as MPO cores.

    MPO(W) = T(1)[d0, i1, j1, d1] x ... x T(m)[d_{m-1}, i_m, j_m, d_m]          (lora-over.txt Eq. 3)

The factorization of each matrix is computed from its shape: the first and last cores carry the real factors of
I and J, middle cores have physical dims 1, bonds follow Eq. 4 (Tables 5 and 7). `lora-over-svd` is the m = 2 case.
Contracting the cores gives back the plain matrix, so the adapter ships as an ordinary LoRA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from opdiff import mpo
from opdiff.methods import Method, register
from opdiff.reparam import StepCached, reparameterize

if TYPE_CHECKING:
    from opdiff.config import AdapterConfig
    from opdiff.inject import AdaptedLayer


class MPOBank(StepCached):
    """Every MPO matrix of one core layout, contracted together: one batched matmul per bond per step.

    Holds no parameters (each matrix's cores stay in its own `MPOWeight`, so checkpoints name them by layer);
    matrices join when they are converted, also mid-run (MPOR).
    """

    def __init__(self) -> None:
        super().__init__()
        self.members: list[MPOWeight] = []

    def compute(self) -> dict[str, torch.Tensor]:
        """Return {"W": (L, I, J)}: the contraction of every member's cores (Eq. 3)."""
        n_cores = len(self.members[0].cores)
        stacked = [torch.stack([w.cores[k] for w in self.members]) for k in range(n_cores)]  # (L, d, i, j, d')
        return {"W": mpo.contract_batched(stacked)}


class MPOWeight(nn.Module):
    """Parametrization: the matrix is the contraction of its trainable MPO cores."""

    is_mpo = True  # marks the cores for the `mpo_lr` optimizer group

    def __init__(self, cores: list[torch.Tensor], bank: MPOBank | None = None) -> None:
        super().__init__()
        self.cores = nn.ParameterList([nn.Parameter(c) for c in cores])  # each (d_{k-1}, i_k, j_k, d_k)
        object.__setattr__(self, "bank", bank)  # not a submodule: the bank belongs to `model.opdiff`
        self.index = -1
        if bank is not None:
            self.index = len(bank.members)
            bank.members.append(self)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.bank is not None and self.bank._caching:  # inside `materialize`: the batched contraction
            return self.bank.output()["W"][self.index]
        return mpo.contract(list(self.cores))


def to_mpo(linear: nn.Linear, n_cores: int, banks: nn.ModuleDict | None = None) -> MPOWeight:
    """Turn `linear.weight` into MPO cores without changing its value, in place; return the parametrization.

    A matrix that is exactly zero (LoRA's B at init) is not decomposed: an MPO of zero has zero cores whose
    gradients all vanish, so it would never train. Instead a random matrix is decomposed and its last core zeroed:
    the product is still exactly zero, but the zeroed core gets a gradient at once and the others after one step.
    With `banks` (the model's `opdiff` dict) the matrix joins the bank of its core layout for batched contraction.
    """
    w = linear.weight.detach()  # (I, J)
    i_factors = mpo.factorize(w.shape[0], n_cores)
    j_factors = mpo.factorize(w.shape[1], n_cores)
    if w.is_meta:  # shapes only (e.g. counting parameters of a full-size model built without weights)
        d = mpo.bond_dims(i_factors, j_factors)
        cores = [torch.empty(d[k], i, j, d[k + 1], device="meta")
                 for k, (i, j) in enumerate(zip(i_factors, j_factors, strict=True))]
    elif torch.count_nonzero(w) == 0:
        cores = mpo.zero_product_cores(i_factors, j_factors)
    else:
        cores = mpo.decompose(w, i_factors, j_factors)
    bank = None
    if banks is not None:
        key = "mpo_" + "_".join(f"{i}x{j}" for i, j in zip(i_factors, j_factors, strict=True))
        if key not in banks:
            banks[key] = MPOBank()
        bank = banks[key]
    function = MPOWeight([c.to(device=w.device, dtype=w.dtype) for c in cores], bank)
    reparameterize(linear, "weight", function)
    return function


def _attach_all(n_cores_of) -> callable:
    def attach(model: nn.Module, layers: list[AdaptedLayer], config: AdapterConfig) -> None:
        for a in layers:
            to_mpo(a.lora_A, n_cores_of(config), model.opdiff)
            to_mpo(a.lora_B, n_cores_of(config), model.opdiff)
    return attach


register(Method("lora-over-svd", use_dora=False, attach=_attach_all(lambda c: 2),
                summary="LoRA-Over-SVD: every A and B trained as 2 SVD cores; ships as plain LoRA."))
register(Method("lora-over-mpo", use_dora=False, attach=_attach_all(lambda c: c.mpo_cores),
                summary="LoRA-Over-MPO: every A and B trained as an m-core MPO; ships as plain LoRA."))



def core_lr(lr: float, n_cores: int, power: float = 1.5) -> float:
    """Return the learning rate of the cores of an `n_cores`-core chain (SVD: 2) under main learning rate `lr`.

    lr / n_cores**power. `power = 0` is the paper: the cores train at the main rate (lora-over.txt Tables 4 and
    6 set MPO_LR next to LR). Why a power: under Adam every core's entries move by about lr per step whatever
    the size of their gradient, so each of the m factors of a matrix grows about as fast as a LoRA matrix does
    and their growth multiplies. On bench/paper_toys.py's frozen ReLU MLP at Adam lr 1e-2, A's factors grew
    13x together in 40 steps for LoRA, 31x, 338x and 677x for m = 3, 5, 8; B A overshot, every pre-activation
    of the adapted layer went negative, and with all 512 ReLUs dead no gradient comes back (loss stuck at
    ln 10) while LoRA trains. lr / m (equal first-order speed) still collapses there, because the growth
    compounds; lr / m**1.5, the default, trains m = 2, 3, 5, 8 at that lr (bench/RESULTS.md).
    """
    if n_cores < 2:
        raise ValueError(f"core_lr: a chain has at least 2 cores, got n_cores={n_cores}")
    if power < 0:
        raise ValueError(f"core_lr: power must be >= 0 (0 = the paper's main lr), got power={power}")
    return lr / n_cores**power
