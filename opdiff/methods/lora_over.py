"""LoRA-Over (lora-over.txt Sec. 4.2): every LoRA matrix A (r x d_in) and B (d_out x r) trained as MPO cores.

    MPO(W) = T(1)[d0, i1, j1, d1] x ... x T(m)[d_{m-1}, i_m, j_m, d_m]          (lora-over.txt Eq. 3)

The factorization of each matrix is computed from its shape: the first and last cores carry the real factors of
I and J, middle cores have physical dims 1, bonds follow Eq. 4 (Tables 5 and 7). `lora-over-svd` is the m = 2 case.
Contracting the cores gives back the plain matrix, so the adapter ships as an ordinary LoRA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opdiff import mpo
from opdiff.methods.base import Method, register, trainable_parameters
from opdiff.reparam import StepCached, reparameterize
from opdiff.settings import Setting

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


def to_mpo(linear: nn.Linear, n_cores: int, banks: nn.ModuleDict | None = None,
           gauge: str = "symmetric") -> MPOWeight:
    """Turn `linear.weight` into MPO cores without changing its value, in place; return the parametrization.

    A matrix that is exactly zero (LoRA's B at init) is not decomposed: an MPO of zero has zero cores whose
    gradients all vanish, so it would never train. Instead a random matrix is decomposed and its last core zeroed:
    the product is still exactly zero, but the zeroed core gets a gradient at once and the others after one step.
    With `banks` (the model's `opdiff` dict) the matrix joins the bank of its core layout for batched contraction.
    `gauge` places the matrix's scale on the chain (`opdiff.mpo.decompose`).
    """
    w = linear.weight.detach()  # (I, J)
    i_factors = mpo.factorize(w.shape[0], n_cores)
    j_factors = mpo.factorize(w.shape[1], n_cores)
    if w.is_meta:  # shapes only (e.g. counting parameters of a full-size model built without weights)
        d = mpo.bond_dims(i_factors, j_factors)
        cores = [torch.empty(d[k], i, j, d[k + 1], device="meta")
                 for k, (i, j) in enumerate(zip(i_factors, j_factors, strict=True))]
    elif torch.count_nonzero(w) == 0:
        cores = mpo.zero_product_cores(i_factors, j_factors, gauge=gauge)
    else:
        cores = mpo.decompose(w, i_factors, j_factors, gauge)
    bank = None
    if banks is not None:
        key = "mpo_" + "_".join(f"{i}x{j}" for i, j in zip(i_factors, j_factors, strict=True))
        if key not in banks:
            banks[key] = MPOBank()
        bank = banks[key]
    function = MPOWeight([c.to(device=w.device, dtype=w.dtype) for c in cores], bank)
    reparameterize(linear, "weight", function)
    return function


MPO_CORES = Setting(
    "mpo_cores", int, 5, "How many small tensors (cores) each adapter matrix is split into while training. More cores "
    "train more parameters; the exported file is the same plain LoRA.",
    ref="lora-over.txt Eq. 3: the number of local tensors m; lora-over-svd always uses 2", label="MPO cores",
    minimum=2)
MPO_LR = Setting(
    "mpo_lr", float | None, None, "Learning rate of the small tensors (cores) each adapter matrix is split into "
    "while training.", optional=True,
    none_means="the main learning rate divided by (number of cores)^mpo_lr_power, at most mpo_lr_cap / cores^2",
    ref="lora-over.txt Tables 4 and 6, MPO_LR", label="core learning rate", above=0)
MPO_LR_POWER = Setting(
    "mpo_lr_power", float, 0.0, "How much slower the cores learn than the main rate when no core learning rate is "
    "given: lr / cores^power. 0 trains them at the main rate, as the paper does.",
    ref="lora-over.txt Tables 4 and 6 (MPO_LR = LR); bench/RESULTS.md, core learning-rate sweep",
    label="core lr power", minimum=0, absent=0.0)  # runs from before this setting trained cores at the main lr
MPO_LR_CAP = Setting(
    "mpo_lr_cap", float, 1e-2, "The most the cores' learning rate may be when no core learning rate is given: this "
    "divided by (number of cores)^2. Keeps chains of cores from blowing up at learning rates where LoRA trains; "
    "below it the cores learn at the paper's rate. 0 turns the limit off. Not used with Prodigy, whose learning rate "
    "is a multiplier of a step size it finds itself.",
    ref="bench/RESULTS.md, core learning-rate sweep (a departure from lora-over.txt, which has no limit)",
    label="core lr limit", minimum=0, absent=0.0)  # runs from before this setting had no limit
MPO_GAUGE = Setting(
    "mpo_gauge", str, "symmetric", "Where each adapter matrix's size sits on its chain of cores when training "
    "starts. It changes how fast each core learns, not the matrix.", choices=mpo.GAUGES,
    choice_help=("every core carries the square root of the singular values on each side of it (balanced)",
                 "the paper's Algorithm 1: every core but the last is orthonormal, the last carries the whole size"),
    ref="lora-over.txt Alg. 1, App. B (left); bench/RESULTS.md, gauge comparison", label="MPO gauge",
    absent="symmetric")  # runs from before this setting used the symmetric gauge


def core_lr(lr: float, n_cores: int, power: float = 0.0, cap: float = 1e-2) -> float:
    """Return the learning rate of the cores of an `n_cores`-core chain (SVD: 2) under main learning rate `lr`.

    min(lr / n_cores**power, cap / n_cores**2); `cap = 0` drops the limit. `power = 0` without a cap is the paper:
    the cores train at the main rate (lora-over.txt Tables 4 and 6 set MPO_LR next to LR).

    Why a limit: under Adam every core's entries move by about the core rate per step whatever the size of their
    gradient, so each of the m factors of a matrix grows about as fast as a LoRA matrix does and their growth
    multiplies. On bench/paper_toys.py's frozen ReLU MLP at Adam lr 1e-2, A's factors grew 13x together in 40
    steps for LoRA, 31x, 338x and 677x for m = 3, 5, 8; B A overshot, every pre-activation of the adapted layer
    went negative, and with all 512 ReLUs dead no gradient comes back (loss stuck at ln 10) while LoRA trains.
    Only the cores' rate decides it (lora-over-mpo trains nothing else), and the rate a chain survives falls
    about as 1/m^2 there (about 1e-2, 2e-3, 1.5e-3 and 7e-4 for m = 2, 3, 5, 8). A power of the main rate cannot
    both keep the paper's speed at low rates and stay below that at high ones; a limit does (bench/RESULTS.md).
    """
    if n_cores < 2:
        raise ValueError(f"core_lr: a chain has at least 2 cores, got n_cores={n_cores}")
    if power < 0:
        raise ValueError(f"core_lr: power must be >= 0 (0 = the paper's main lr), got power={power}")
    if cap < 0:
        raise ValueError(f"core_lr: cap must be >= 0 (0 = no limit), got cap={cap}")
    rate = lr / n_cores**power
    return min(rate, cap / n_cores**2) if cap > 0 else rate


def mpo_cores(model: nn.Module) -> list[nn.Parameter]:
    """The model's MPO/SVD cores in module order (the order optimizer state is saved in)."""
    return [p for m in model.modules() if isinstance(m, MPOWeight) for p in m.parameters() if p.requires_grad]


def n_add(model: nn.Module) -> int:
    """Parameters the MPO cores add over the plain matrices they replace (lora-over.txt Eq. 6, summed)."""
    total = 0
    for m in model.modules():
        if isinstance(m, MPOWeight):
            i_factors = [c.shape[1] for c in m.cores]
            j_factors = [c.shape[2] for c in m.cores]
            total += mpo.n_add(i_factors, j_factors)
    return total


class LoRAOver(Method):
    """LoRA-Over SVD/MPO: every A and B trained as cores (`n_cores(config)` of them); cores get `mpo_lr`."""

    def __init__(self, name: str, summary: str, n_cores, **kw: Any) -> None:
        super().__init__(name, summary, **kw)
        self.n_cores = n_cores

    def attach(self, model: nn.Module, layers: list[AdaptedLayer], config: AdapterConfig) -> None:
        for a in layers:
            to_mpo(a.lora_A, self.n_cores(config), model.opdiff, config.mpo_gauge)
            to_mpo(a.lora_B, self.n_cores(config), model.opdiff, config.mpo_gauge)

    def param_groups(self, model: nn.Module, lr: float, relative: bool = False) -> list[dict]:
        """An "adapter" group at `lr` (if anything is not a core) and an "mpo" group of the cores at `mpo_lr`, or
        at `core_lr` of `lr` when none is set (at `lr` itself when `relative`: the limit is an absolute rate)."""
        cores = mpo_cores(model)
        core_ids = {id(p) for p in cores}
        rest = [p for p in trainable_parameters(model) if id(p) not in core_ids]
        config = model.opdiff_config
        mpo_lr = config.mpo_lr
        if mpo_lr is None:
            mpo_lr = lr if relative else core_lr(lr, self.n_cores(config), config.mpo_lr_power, config.mpo_lr_cap)
        groups = [{"params": rest, "lr": lr, "name": "adapter"}] if rest else []
        return groups + [{"params": cores, "lr": mpo_lr, "name": "mpo"}]

    def report(self, model: nn.Module) -> dict[str, Any]:
        """N_add of Eq. 6 over every matrix that has cores now."""
        return {"n_add": n_add(model)}


register(LoRAOver(
    "lora-over-svd", "LoRA-Over-SVD: every A and B trained as 2 SVD cores; ships as plain LoRA.",
    n_cores=lambda config: 2, settings=(MPO_LR, MPO_LR_POWER, MPO_LR_CAP, MPO_GAUGE),
    about="LoRA-Over with SVD: every adapter matrix is trained as two factors and multiplied back at export. "
          "A light over-parameterization (1.7x LoRA's trainable parameters on SDXL); ships as a plain LoRA.",
    ref="lora-over.txt Sec. 4.2",
))
register(LoRAOver(
    "lora-over-mpo", "LoRA-Over-MPO: every A and B trained as an m-core MPO; ships as plain LoRA.",
    n_cores=lambda config: config.mpo_cores, settings=(MPO_CORES, MPO_LR, MPO_LR_POWER, MPO_LR_CAP, MPO_GAUGE),
    about="LoRA-Over with MPO: every adapter matrix is trained as a chain of small tensors and multiplied back at "
          "export. About 4x LoRA's trainable parameters, 1.2x its time per step and 0.4 GB more memory on SDXL; "
          "ships as a plain LoRA.",
    ref="lora-over.txt Sec. 4.2, Eq. 3",
))
