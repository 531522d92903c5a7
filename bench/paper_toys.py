"""op-lora.txt's two small studies with every registered method, and two stability sweeps. Minutes on a CPU.

    nice python bench/paper_toys.py [--studies mf,digits,mpo,z] [--quick]

- `mf` (op-lora.txt App. B.2, Fig. 5 and 6): factor a 100 x 100 matrix with entries uniform in [0, 1] at rank 8,
  ||M - W||_F^2 with W = W0 + B A, 1000 steps, SGD with 50 linear warm-up steps then linear decay to zero, also
  with momentum 0.9 and with Adam. Every method runs on one adapted `nn.Linear(100, 100)` whose base W0 is
  N(0, 1e-6) (the paper's base is zero; DoRA divides by ||W0 + s B A||, so an exact zero base is undefined for
  it). Reported: the final error over the rank-8 SVD optimum of M - W0 (1.00 = the optimum, Eckart-Young), and
  the effective rank exp(-sum p_i log p_i), p_i = sigma_i / sum sigma, of the learned update (App. B.2).
- `digits` (op-lora.txt Sec. 3.3, Fig. 2): a 784-512-10 ReLU MLP trained on upright procedural digits (PIL's
  default font, random size, stroke, position and noise, 28 x 28; MNIST cannot be downloaded here) to near zero
  loss, frozen, then adapted at rank 4 (both layers) to the same kind of digits randomly rotated, with Adam at
  learning rates over four orders of magnitude. Reported: the loss on the whole rotated training set after
  training, and how many of the 512 hidden ReLUs are dead (zero for every training image).
- `mpo`: why lora-over-mpo collapses on `digits` at Adam lr 1e-2 and what keeps it stable: the size of the first
  updates of A, B and B A per core count, and sweeps over m and lr of the cores' learning rate
  `opdiff.methods.lora_over.core_lr` (min(lr / m^power, cap / m^2); power 0 without a cap is the paper) and of
  the gauge (`mpo_gauge`: symmetric, or Alg. 1's left), on `digits` and on `mf` with Adam.
- `z`: OP-LoRA's initial z scale on both studies: N(0, 1) (the default), N(0, 1/e) (||z|| about 1), and the scale
  at which the generated A starts with PEFT's kaiming-uniform A's standard deviation.

MPOP and MPOR run through the same loop; their selection needs calls into the method, made in `method_hooks`.
With one layer per group here, top-N = 1 selects every layer: MPOR at an eighth of the run; MPOP scores a LoRA
trained for the first quarter, then trains MPO from the base for the rest (lora-over.txt Alg. 2). The tables also
have variants: `lora-over-mpop in place` (the scored LoRA keeps training, as MPO) and `<method> default`
(opdiff's default core rate, min(lr, 1e-2 / m^2), instead of the paper's main lr).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import opdiff  # noqa: E402
from opdiff.methods.lora_over import MPO_LR_CAP, core_lr  # noqa: E402

METHODS = list(opdiff.METHODS)


# ---------------------------------------------------------------------------------------------------------------
# The training loop every study shares
# ---------------------------------------------------------------------------------------------------------------


def method_hooks(model: nn.Module, when: str, step: int = 0, optimizer=None, eval_loss=None) -> None:
    """The loop's calls into the injected method's hooks: `before_training` (step 0), `after_backward` and
    `after_step` (1-based step)."""
    method = opdiff.method_of(model)
    if when == "before_training":
        method.before_training(model, optimizer, lambda n: eval_loss())
    elif when == "after_backward":
        method.after_backward(model, step)
    else:
        method.after_step(model, step, optimizer, lambda n: eval_loss())


VARIANTS = {  # table rows beyond the registry: label -> (method, settings)
    "lora-over-mpop in place": ("lora-over-mpop", {"select_restart": False}),
    # opdiff's default core rate (None: filled in below) instead of the paper's
    **{f"{m} default": (m, {"mpo_lr_cap": None}) for m in ("lora-over-svd", "lora-over-mpo", "lora-over-mpop",
                                                          "lora-over-mpor")},
}


def method_and_options(label: str) -> tuple[str, dict]:
    """A table row's method and settings: a registered method as the paper sets it, or one of `VARIANTS`."""
    method, options = VARIANTS.get(label, (label, {}))
    return method, {k: MPO_LR_CAP.default if k == "mpo_lr_cap" and v is None else v for k, v in options.items()}


def adapter_config(method: str, rank: int, targets: tuple[str, ...], steps: int, **kw) -> opdiff.AdapterConfig:
    """The method's config, its selection schedule scaled to a `steps`-step run (one layer per group: N = 1)."""
    kw.setdefault("mpo_lr_power", 0.0)  # the paper's core rate (no power, no limit) unless a study sets it
    kw.setdefault("mpo_lr_cap", 0.0)
    return opdiff.AdapterConfig(method=method, rank=rank, alpha=float(rank), target_modules=targets,
                                select_top_n=1, select_split=1, select_every=max(1, steps // 8),
                                select_warmup_steps=max(1, steps // 4), select_batches=1, **kw)


def make_optimizer(model: nn.Module, name: str, lr: float, mpo_lr: float | None = None) -> torch.optim.Optimizer:
    """SGD, SGD with momentum 0.9, or Adam (op-lora.txt Fig. 6), over opdiff's parameter groups."""
    groups = opdiff.param_groups(model, lr=lr)
    if mpo_lr is not None:
        for g in groups:
            if g["name"] == "mpo":
                g["lr"] = mpo_lr
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.Adam(groups, lr=lr)


def fit(model: nn.Module, loss_at: Callable[[int], torch.Tensor], optimizer: torch.optim.Optimizer, steps: int,
        schedule: Callable[[int], float] | None = None, eval_loss: Callable[[], float] | None = None,
        every: Callable[[int], None] | None = None) -> list[float]:
    """Train `steps` steps; `schedule(step)` multiplies every group's lr; `every(step)` observes after each step."""
    base = [g["lr"] for g in optimizer.param_groups]
    losses = []
    method_hooks(model, "before_training", 0, optimizer, eval_loss)
    for step in range(1, steps + 1):
        if schedule is not None:
            for g, lr in zip(optimizer.param_groups, base, strict=True):
                g["lr"] = lr * schedule(step)
        with opdiff.materialize(model):
            loss = loss_at(step)
            loss.backward()
        method_hooks(model, "after_backward", step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method_hooks(model, "after_step", step, optimizer, eval_loss)
        losses.append(loss.item())
        if every is not None:
            every(step)
    return losses


def scale_op_z(model: nn.Module, z_scale: str) -> None:
    """Rescale every OP generator's z in place: the same as building it with `OPGenerator(..., z_std=s)`.

    "1": N(0, 1), the default. "unit": N(0, 1/e), so ||z|| is about 1. "peft": the std at which the generated A
    starts with the std of PEFT's kaiming-uniform A, 1/sqrt(3 d_in): std(A) = std(z) / sqrt(18) at init
    (W1, W2 kaiming uniform with a = sqrt(5), half the ReLUs open), so std(z) = sqrt(6 / d_in).
    """
    for gen in model.opdiff.values():
        if not hasattr(gen, "z") or z_scale == "1":
            continue
        std = 1 / math.sqrt(gen.z.shape[1]) if z_scale == "unit" else math.sqrt(6 / gen.d_in)
        with torch.no_grad():
            gen.z.mul_(std)


# ---------------------------------------------------------------------------------------------------------------
# Study 2: a frozen digit MLP adapted to rotated digits (op-lora.txt Sec. 3.3)
# ---------------------------------------------------------------------------------------------------------------


def render_digits(n: int, seed: int, rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """n seeded 28 x 28 digit images (n, 784) in [0, 1] and labels (n,).

    Each digit is PIL's default font at a random size (26-40 px on a 56 px canvas), stroke width (0-2) and offset
    (+-5 px), optionally rotated by a uniform angle in [0, 360), downsampled 2x, plus N(0, 0.1^2) noise.
    """
    rng = np.random.default_rng(seed)
    fonts = {s: ImageFont.load_default(size=s) for s in range(26, 41)}
    images = np.empty((n, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, size=n)
    for k in range(n):
        canvas = Image.new("L", (56, 56), 0)
        draw = ImageDraw.Draw(canvas)
        font = fonts[int(rng.integers(26, 41))]
        stroke = int(rng.integers(0, 3))
        left, top, right, bottom = draw.textbbox((0, 0), str(labels[k]), font=font, stroke_width=stroke)
        x = (56 - (right - left)) / 2 - left + rng.uniform(-5, 5)
        y = (56 - (bottom - top)) / 2 - top + rng.uniform(-5, 5)
        draw.text((x, y), str(labels[k]), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
        if rotate:
            canvas = canvas.rotate(rng.uniform(0, 360), resample=Image.BILINEAR)
        images[k] = np.asarray(canvas.resize((28, 28), Image.BILINEAR), dtype=np.float32) / 255.0
    images += rng.normal(0, 0.1, size=images.shape).astype(np.float32)
    return torch.from_numpy(images.clip(0, 1).reshape(n, 784)), torch.from_numpy(labels)


class DigitMLP(nn.Module):
    """The paper's base: a two-layer MLP with hidden width 512."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.fc2 = nn.Linear(512, 10)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(x))  # (N, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))  # (N, 10)


class Digits:
    """The data and the frozen base of the digits study, built once per process (seeded)."""

    def __init__(self, n: int = 6000, base_epochs: int = 15, seed: int = 0) -> None:
        self.upright = render_digits(n, seed, rotate=False)
        self.rotated = render_digits(n, seed + 1, rotate=True)
        torch.manual_seed(seed)
        base = DigitMLP()
        opt = torch.optim.Adam(base.parameters(), lr=1e-3)
        x, y = self.upright
        g = torch.Generator().manual_seed(seed)
        for _ in range(base_epochs):
            for idx in torch.randperm(n, generator=g).split(128):
                F.cross_entropy(base(x[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad()
        self.base_state = {k: v.clone() for k, v in base.state_dict().items()}
        with torch.no_grad():
            self.base_upright_loss = float(F.cross_entropy(base(x), y))
            self.base_rotated_loss = float(F.cross_entropy(base(self.rotated[0]), self.rotated[1]))

    def base(self) -> DigitMLP:
        model = DigitMLP()
        model.load_state_dict(self.base_state)
        return model

    def batches(self, steps: int, batch: int = 128, seed: int = 0) -> list[torch.Tensor]:
        """Index batches for `steps` steps: epochs of a seeded permutation of the rotated set."""
        g = torch.Generator().manual_seed(seed)
        n = self.rotated[1].shape[0]
        out: list[torch.Tensor] = []
        while len(out) < steps:
            out += list(torch.randperm(n, generator=g).split(batch))[: n // batch]
        return out[:steps]


def dead_units(model: DigitMLP, x: torch.Tensor) -> int:
    """Hidden ReLUs of the adapted layer that are zero for every image in x."""
    with torch.no_grad(), opdiff.materialize(model):
        return int((model.hidden(x).amax(dim=0) <= 0).sum())


def digits_run(data: Digits, method: str, lr: float, steps: int = 600, mpo_cores: int = 5,
               mpo_lr: float | None = None, z_scale: str = "1", every=None, seed: int = 0, **options) -> dict:
    """Adapt the frozen base to rotated digits with Adam; return the final loss and dead ReLUs.

    `seed` draws the adapter's initialization and the batch order; `options`: more method settings (e.g.
    `mpo_gauge`)."""
    torch.manual_seed(seed)
    model = data.base()
    opdiff.inject(model, adapter_config(method, 4, ("fc1", "fc2"), steps, mpo_cores=mpo_cores, **options))
    scale_op_z(model, z_scale)
    x, y = data.rotated
    batches = data.batches(steps, seed=seed)
    opt = make_optimizer(model, "adam", lr, mpo_lr)

    def eval_loss() -> float:
        with torch.no_grad(), opdiff.materialize(model):
            return float(F.cross_entropy(model(x[batches[0]]), y[batches[0]]))

    start = time.perf_counter()
    fit(model, lambda step: F.cross_entropy(model(x[batches[step - 1]]), y[batches[step - 1]]), opt, steps,
        eval_loss=eval_loss, every=every and (lambda step: every(model, step)))
    with torch.no_grad(), opdiff.materialize(model):
        loss = float(F.cross_entropy(model(x), y))
    return {"loss": loss, "dead": dead_units(model, x), "s": time.perf_counter() - start, "model": model}


# ---------------------------------------------------------------------------------------------------------------
# Study 1: matrix factorization (op-lora.txt App. B.2)
# ---------------------------------------------------------------------------------------------------------------


class Factorization(nn.Module):
    """One 100 x 100 Linear: the adapted weight W = W0 + B A is the factorization (forward(I) = W^T)."""

    def __init__(self, n: int, w0: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.w.weight.copy_(w0)

    def forward(self, eye: torch.Tensor) -> torch.Tensor:
        return self.w(eye)


def mf_problem(n: int = 100, rank: int = 8, seed: int = 0) -> dict:
    """M (n, n) uniform in [0, 1], W0 ~ N(0, 1e-6), and the rank-`rank` SVD optimum of ||M - W0 - B A||^2 / n^2."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, n, generator=g)
    w0 = 1e-3 * torch.randn(n, n, generator=g)
    u, s, vh = torch.linalg.svd((m - w0).double())
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return {"M": m, "W0": w0, "optimum": float((s[rank:] ** 2).sum()) / n**2, "rank": rank,
            "optimum_erank": effective_rank(best, rank)}


def effective_rank(w: torch.Tensor, r: int) -> float:
    """op-lora.txt App. B.2: exp(-sum p_i log p_i) over the r largest singular values, p_i = sigma_i / sum sigma."""
    s = torch.linalg.svdvals(w.double())[:r]
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def warmup_linear_decay(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps to the full lr, then linear decay to zero at `steps` (App. B.2)."""
    return lambda step: step / warmup if step <= warmup else (steps - step) / (steps - warmup)


def mf_run(problem: dict, method: str, optimizer: str, lr: float, steps: int = 1000, warmup: int = 50,
           z_scale: str = "1", mpo_lr: float | None = None, **options) -> dict:
    """Factor M with one method and optimizer; return the final error over the SVD optimum and the effective rank.

    `options`: more method settings (e.g. `mpo_cores`, `mpo_gauge`)."""
    torch.manual_seed(0)
    n = problem["M"].shape[0]
    model = Factorization(n, problem["W0"])
    opdiff.inject(model, adapter_config(method, problem["rank"], ("w",), steps, op_width=32, op_embed_dim=128,
                                        **options))
    scale_op_z(model, z_scale)
    eye, target = torch.eye(n), problem["M"].T  # model(eye) = W^T
    opt = make_optimizer(model, optimizer, lr, mpo_lr)

    def loss_now() -> torch.Tensor:
        return (model(eye) - target).square().mean()

    def eval_loss() -> float:
        with torch.no_grad(), opdiff.materialize(model):
            return float(loss_now())

    start = time.perf_counter()
    fit(model, lambda step: loss_now(), opt, steps, warmup_linear_decay(steps, warmup), eval_loss)
    with torch.no_grad(), opdiff.materialize(model):
        err = float(loss_now())
        update = model(eye).T - problem["W0"]  # the learned B A (for DoRA: the adapted weight less W0)
    return {"ratio": err / problem["optimum"] if math.isfinite(err) else float("inf"),
            "erank": effective_rank(update, problem["rank"]) if math.isfinite(err) else float("nan"),
            "s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

MF_LRS = {"sgd": (0.3, 1.0, 3.0, 10.0), "momentum": (0.03, 0.1, 0.3, 1.0), "adam": (1e-3, 3e-3, 1e-2, 3e-2)}
DIGIT_LRS = (1e-5, 1e-4, 1e-3, 1e-2)
SWEEP_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 3e-2)
SWEEP_POWERS = (0.0, 1.0, 1.5, 2.0)
SWEEP_CORES = (2, 3, 5, 8)
SWEEP_CAPS = (5e-3, 1e-2, 2e-2)


def row(label: str, cells: list[str], width: int = 16) -> str:
    return f"{label:<{width}}" + "".join(f"{c:>14}" for c in cells)


def study_mf(methods: list[str], steps: int) -> None:
    problem = mf_problem()
    print(f"\n## mf: ||M - W||^2 / n^2 after {steps} steps over the rank-8 SVD optimum ({problem['optimum']:.4f}),"
          f" effective rank of the update (SVD optimum: {problem['optimum_erank']:.2f})")
    for name, lrs in MF_LRS.items():
        print(f"\n{name}")
        print(row("method", [f"lr {lr:g}" for lr in lrs], 24))
        for label in methods:
            method, options = method_and_options(label)
            runs = [mf_run(problem, method, name, lr, steps=steps, **options) for lr in lrs]
            print(row(label, [f"{r['ratio']:.3f} ({r['erank']:.2f})" for r in runs], 24), flush=True)


def study_digits(data: Digits, methods: list[str], steps: int) -> None:
    print(f"\n## digits: loss on the rotated training set after {steps} Adam steps (dead ReLUs of 512)")
    print(f"base: {data.base_upright_loss:.4f} on upright digits, {data.base_rotated_loss:.3f} on rotated, "
          f"{dead_units(data.base(), data.rotated[0])} dead on rotated")
    print(row("method", [f"lr {lr:g}" for lr in DIGIT_LRS], 24))
    for label in methods:
        method, options = method_and_options(label)
        runs = [digits_run(data, method, lr, steps=steps, **options) for lr in DIGIT_LRS]
        print(row(label, [f"{r['loss']:.3f} ({r['dead']})" for r in runs], 24), flush=True)


def first_steps(data: Digits, method: str, m: int, lr: float, steps: int, mpo_lr: float | None = None) -> list[str]:
    """The adapted layer fc1 over a run: |A_2 - A_1| / |A_1|, |B A| (dead ReLUs) at steps 10 and 40, the growth of
    A's factors from step 1 to 40 (the product over A's cores, or A itself, of spectral-norm ratios: how much
    of A's growth compounds), and the final loss (dead ReLUs)."""
    seen: dict = {}

    def factor_norms(model) -> list[float]:
        lin = opdiff.adapted_layers(model)[0].lora_A
        tensors = list(lin.parametrizations.weight[0].cores) if hasattr(lin, "parametrizations") else [lin.weight]
        return [float(torch.linalg.matrix_norm(t.detach().reshape(-1, t.shape[-1]), 2)) for t in tensors]

    def every(model, step) -> None:
        a = opdiff.adapted_layers(model)[0]
        with torch.no_grad(), opdiff.materialize(model):
            w_a, ba = a.lora_A.weight.detach().clone(), (a.lora_B.weight @ a.lora_A.weight).norm().item()
        if step == 1:
            seen["A1"], seen["n1"] = w_a, factor_norms(model)
        if step == 2:
            seen["dA"] = float((w_a - seen["A1"]).norm() / seen["A1"].norm())
        if step in (10, 40):
            seen[step] = (ba, dead_units(model, data.rotated[0]))
        if step == 40:
            seen["growth"] = math.prod(b / a for a, b in zip(seen["n1"], factor_norms(model), strict=True))

    r = digits_run(data, method, lr, steps=steps, mpo_cores=m, mpo_lr=mpo_lr, every=every)
    return [f"{seen['dA']:.3f}", f"{seen[10][0]:.3g} ({seen[10][1]})", f"{seen[40][0]:.3g} ({seen[40][1]})",
            f"{seen['growth']:.1f}x", f"{r['loss']:.3f} ({r['dead']})"]


def sweep_row(data: Digits, m: int, steps: int, power: float, cap: float, gauge: str) -> list[str]:
    """Digits loss (dead ReLUs) per SWEEP_LRS with the cores at core_lr(lr, m, power, cap) in `gauge`."""
    method = "lora-over-svd" if m == 2 else "lora-over-mpo"
    runs = [digits_run(data, method, lr, steps=steps, mpo_cores=m, mpo_lr=core_lr(lr, m, power, cap),
                       mpo_gauge=gauge) for lr in SWEEP_LRS]
    return [f"{r['loss']:.3f} ({r['dead']})" for r in runs]


def study_mpo(data: Digits, steps: int, quick: bool) -> None:
    print("\n## mpo: fc1 under Adam at lr 1e-2 (cores at the main lr, the paper): relative change of A at step 2,"
          " |B A| (dead ReLUs) at steps 10 and 40, growth of A's factors from step 1 to 40 (product of their"
          " spectral-norm ratios), final loss (dead)")
    print(row("method", ["dA/A step 2", "|BA| step 10", "|BA| step 40", "A growth", "final"], 20))
    for method, m in [("lora", 5), ("lora-over-svd", 2), ("lora-over-mpo", 3), ("lora-over-mpo", 5),
                      ("lora-over-mpo", 8)]:
        label = method if method != "lora-over-mpo" else f"{method} m={m}"
        print(row(label, first_steps(data, method, m, 1e-2, steps), 20), flush=True)
    print(f"\nthe same with cores at core_lr's default, min(lr, {MPO_LR_CAP.default:g} / m^2)")
    for method, m in [("lora-over-svd", 2), ("lora-over-mpo", 3), ("lora-over-mpo", 5), ("lora-over-mpo", 8)]:
        label = method if method != "lora-over-mpo" else f"{method} m={m}"
        print(row(label, first_steps(data, method, m, 1e-2, steps, core_lr(1e-2, m)), 20), flush=True)

    cores = SWEEP_CORES[::2] if quick else SWEEP_CORES
    print(f"\n## mpo sweep: digits loss (dead ReLUs) after {steps} Adam steps, cores at"
          " core_lr(lr, m, power, cap) = min(lr / m^power, cap / m^2) (cap 0: no limit; power 0, cap 0 = the paper)")
    print(row("gauge  power cap  m", [f"lr {lr:g}" for lr in SWEEP_LRS], 22))
    print(row("lora", [f"{r['loss']:.3f} ({r['dead']})" for r in (digits_run(data, "lora", lr, steps=steps)
                                                                  for lr in SWEEP_LRS)], 22), flush=True)
    settings = [("symmetric", p, 0.0) for p in (SWEEP_POWERS[::2] if quick else SWEEP_POWERS)]
    settings += [("symmetric", 0.0, cap) for cap in SWEEP_CAPS]
    settings += [("left", 0.0, 0.0), ("left", 1.5, 0.0), ("left", 0.0, 1e-2)]
    for gauge, power, cap in settings:
        for m in cores:
            print(row(f"{gauge:<9} {power:<5g} {cap:<5g} {m}", sweep_row(data, m, steps, power, cap, gauge), 22),
                  flush=True)

    seeds = range(1, 3 if quick else 6)
    print(f"\n## mpo seeds: digits loss (dead ReLUs) at lr {SWEEP_LRS[-1]:g} (capped: the cores at cap / m^2) with"
          " other seeds of the adapters' initialization and the batch order")
    print(row("cap  m", [f"seed {s}" for s in seeds], 22))
    print(row("lora", [f"{r['loss']:.3f} ({r['dead']})" for r in (digits_run(data, "lora", SWEEP_LRS[-1], steps=steps,
                                                                             seed=s) for s in seeds)], 22))
    for cap in SWEEP_CAPS[1:]:
        for m in cores:
            method = "lora-over-svd" if m == 2 else "lora-over-mpo"
            runs = [digits_run(data, method, SWEEP_LRS[-1], steps=steps, mpo_cores=m, seed=s,
                               mpo_lr=core_lr(SWEEP_LRS[-1], m, 0.0, cap)) for s in seeds]
            print(row(f"{cap:<5g}{m}", [f"{r['loss']:.3f} ({r['dead']})" for r in runs], 22), flush=True)

    problem = mf_problem()
    print("\n## mpo sweep on mf with Adam: final error over the SVD optimum (effective rank of the update)")
    print(row("power cap  m", [f"lr {lr:g}" for lr in MF_LRS["adam"]]))
    print(row("lora", [f"{r['ratio']:.3f} ({r['erank']:.2f})" for r in (mf_run(problem, "lora", "adam", lr)
                                                                        for lr in MF_LRS["adam"])]), flush=True)
    for power, cap in [(0.0, 0.0), (1.5, 0.0), *((0.0, cap) for cap in SWEEP_CAPS)]:
        for m in cores:
            method = "lora-over-svd" if m == 2 else "lora-over-mpo"
            runs = [mf_run(problem, method, "adam", lr, mpo_cores=m, mpo_lr=core_lr(lr, m, power, cap))
                    for lr in MF_LRS["adam"]]
            print(row(f"{power:<5g} {cap:<5g} {m}", [f"{r['ratio']:.3f} ({r['erank']:.2f})" for r in runs]),
                  flush=True)


def study_z(data: Digits, steps_mf: int, steps_digits: int) -> None:
    problem = mf_problem()
    scales = ("1", "unit", "peft")
    print("\n## z: OP generators' initial z scale (1: N(0, 1), the default; unit: N(0, 1/e); peft: A starts at"
          " PEFT's A std)")
    for method in ("op-lora", "op-dora"):
        for name, lrs in MF_LRS.items():
            print(f"\nmf {name}, {method}: final error over the SVD optimum")
            print(row("z", [f"lr {lr:g}" for lr in lrs]))
            for z in scales:
                runs = [mf_run(problem, method, name, lr, steps=steps_mf, z_scale=z) for lr in lrs]
                print(row(z, [f"{r['ratio']:.3f}" for r in runs]), flush=True)
        print(f"\ndigits, {method}: loss (dead ReLUs)")
        print(row("z", [f"lr {lr:g}" for lr in DIGIT_LRS]))
        for z in scales:
            runs = [digits_run(data, method, lr, steps=steps_digits, z_scale=z) for lr in DIGIT_LRS]
            print(row(z, [f"{r['loss']:.3f} ({r['dead']})" for r in runs]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", default="mf,digits,mpo,z", help="comma-separated: mf, digits, mpo, z")
    parser.add_argument("--methods", default=",".join([*METHODS, *VARIANTS]),
                        help="methods (and VARIANTS) of the mf and digits tables")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps and fewer sweep points")
    args = parser.parse_args()
    torch.set_num_threads(1)
    studies = args.studies.split(",")
    methods = args.methods.split(",")
    mf_steps, digit_steps = (100, 100) if args.quick else (1000, 600)
    start = time.perf_counter()
    if "mf" in studies:
        study_mf(methods, mf_steps)
    data = Digits(n=1000 if args.quick else 6000) if {"digits", "mpo", "z"} & set(studies) else None
    if "digits" in studies:
        study_digits(data, methods, digit_steps)
    if "mpo" in studies:
        study_mpo(data, max(digit_steps, 60), args.quick)
    if "z" in studies:
        study_z(data, mf_steps, digit_steps)
    print(f"\n{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
