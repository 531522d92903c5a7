"""LoRA-Over-MPOP and -MPOR selection (lora-over.txt Sec. 4.3, Eq. 7, Eq. 8, Alg. 2) on small models.

Expected values are computed here from the paper: groups by module kind x self/cross attention x shape, N as a
share of each group, Eq. 7 by zeroing a layer by hand, Eq. 8 from this file's own autograd, MPOR's scores added up
over the whole run, MPOP's chosen structure trained from the base again.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from test_methods import TinyAttention, TinyNet, batch
from torch import nn

import opdiff
from opdiff.methods.lora_over import MPOWeight

LEGACY = {"select_groups": "suffix-and-matrix", "select_accumulate": "round", "select_restart": False}


def make(method: str, net: type[nn.Module] = TinyNet, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = net()
    cfg = dict(method=method, rank=4, mpo_cores=3, select_top_n=2, select_split=2, select_every=2,
               select_warmup_steps=2, select_batches=2)
    cfg.update(kw)
    return opdiff.inject(model, opdiff.AdapterConfig(**cfg))


def loss_on(model, seed: int) -> torch.Tensor:
    x, ctx, y = batch(seed)
    return torch.nn.functional.mse_loss(model(x, ctx), y)


def eval_loss(model):
    def f(n: int = 2) -> float:
        with torch.no_grad(), opdiff.materialize(model):
            return sum(float(loss_on(model, 100 + i)) for i in range(n)) / n
    return f


def run(model, optimizer, steps: range, observe=None) -> tuple[list[float], list[dict]]:
    """The training loop every pipeline uses, in miniature, with the method's hooks; returns losses and events.

    `observe(model)`, if given, is called after each backward pass (the test's own view of the gradients)."""
    method = opdiff.method_of(model)
    losses, events = [], []
    if steps.start == 0:
        events += method.before_training(model, optimizer, eval_loss(model))
    for step in steps:
        with opdiff.materialize(model):
            loss = loss_on(model, step)
            loss.backward()
        if observe is not None:
            observe(model)
        method.after_backward(model, step + 1)
        optimizer.step()
        optimizer.zero_grad()
        events += method.after_step(model, step + 1, optimizer, eval_loss(model))
        losses.append(loss.item())
    return losses, events


def selector(model):
    """The selection state the MPOP/MPOR methods keep under `model.opdiff`."""
    return model.opdiff["select"]


def lora_layers(model) -> dict[str, nn.Module]:
    return {a.name: a.layer for a in opdiff.adapted_layers(model)}


def has_cores(linear: nn.Module) -> bool:
    return hasattr(linear, "parametrizations")


def layers_with_cores(model) -> set[str]:
    """Layers whose A and B both have cores (asserting no layer has only one of them)."""
    out = set()
    for name, layer in lora_layers(model).items():
        a, b = has_cores(layer.lora_A["default"]), has_cores(layer.lora_B["default"])
        assert a == b, f"{name}: A and B of a layer are chosen together"
        if a:
            out.add(name)
    return out


class Block(nn.Module):
    """A transformer block with diffusers' names: self-attention `attn1` and cross-attention `attn2`."""

    def __init__(self, d: int, d_ctx: int) -> None:
        super().__init__()
        self.attn1 = TinyAttention(d, d)
        self.attn2 = TinyAttention(d, d_ctx)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(x, x)
        return x + self.attn2(x, ctx)


class TwoWidthNet(nn.Module):
    """Three blocks at width 12 and two at width 20, context 10: the shapes and names of an SDXL U-Net, small."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = nn.ModuleList([Block(12, 10) for _ in range(3)])
        self.up = nn.Linear(12, 20)
        self.wide = nn.ModuleList([Block(20, 10) for _ in range(2)])
        self.out = nn.Linear(20, 20)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        for block in self.narrow:
            x = block(x, ctx)
        x = self.up(x)
        for block in self.wide:
            x = block(x, ctx)
        return self.out(x)


class TwelveLayerNet(nn.Module):
    """Twelve self-attention blocks of one width: one group of 12 per module kind, as T5-base's 12 layers."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn1": TinyAttention(12, 12)}) for _ in range(12)])
        self.head = nn.Linear(12, 20)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["attn1"](x, x)
        return self.head(x)


# ------------------------------------------------------------------------------------------------------ groups


def test_groups_are_module_kind_by_self_or_cross_attention_by_shape():
    """Sec. 4.3: matrices of different size and function are never ranked against each other."""
    sel = selector(make("lora-over-mpor", TwoWidthNet))
    members: dict[str, set[str]] = {}
    for unit in sel.units:
        members.setdefault(unit.group, set()).add(unit.layer)
    want: dict[str, set[str]] = {}
    for stack, d, n in (("narrow", 12, 3), ("wide", 20, 2)):
        for attn, role, d_ctx in (("attn1", "self-attention", d), ("attn2", "cross-attention", 10)):
            for kind, shape in (("to_q", (d, d)), ("to_k", (d, d_ctx)), ("to_v", (d, d_ctx)), ("to_out.0", (d, d))):
                want[f"{kind}/{role}/{shape[0]}x{shape[1]}"] = {f"{stack}.{i}.{attn}.{kind}" for i in range(n)}
    assert members == want
    assert all(u.matrices == ("A", "B") for u in sel.units), "one score per layer: A and B ranked together"


@pytest.mark.parametrize(("fraction", "top_n", "chosen"), [
    (0.75, None, 9),   # lora-over.txt Table 4: 9 of T5-base's 12 layers
    (0.9375, None, 12),  # ceil(11.25)
    (0.875, None, 11),  # ceil(10.5); Table 6's 28 of 32 is 0.875 of 32
    (0.01, None, 1),  # at least one per group
    (1.0, None, 12),
    (0.75, 5, 5),  # select_top_n wins
    (0.75, 40, 12),  # at most the group
])
def test_n_is_a_share_of_each_group(fraction, top_n, chosen):
    model = make("lora-over-mpop", TwelveLayerNet, target_modules=("to_q", "to_v"), select_fraction=fraction,
                 select_top_n=top_n, select_warmup_steps=1, select_batches=1)
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    run(model, opt, range(1))
    by_kind = {"to_q": 0, "to_v": 0}
    for name in layers_with_cores(model):
        by_kind[name.rsplit(".", 1)[1]] += 1
    assert by_kind == {"to_q": chosen, "to_v": chosen}


def test_the_papers_share_is_the_default():
    config = opdiff.AdapterConfig(method="lora-over-mpop")
    assert config.select_fraction == 9 / 12 and config.select_top_n is None
    assert config.select_groups == "module" and config.select_restart and config.select_from is None
    mpor = opdiff.AdapterConfig(method="lora-over-mpor")
    assert mpor.select_accumulate == "run" and 5 <= mpor.select_split <= 8  # Tables 4 and 6: 5 to 8


# ------------------------------------------------------------------------------------------------------ MPOR


def eq8_by_autograd(model) -> dict[str, float]:
    """|<dL/dA, A>| and |<dL/dB, B>| of every plain layer, from the .grad the backward pass left; the two are equal
    for plain LoRA (s <dL/dY, B A X> both ways), so one number per layer (checked)."""
    out = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        if has_cores(a):
            continue
        sa = (a.weight.grad.double() * a.weight.double()).sum().abs().item()
        sb = (b.weight.grad.double() * b.weight.double()).sum().abs().item()
        assert sa == pytest.approx(sb, rel=1e-4, abs=1e-12), f"{name}: Eq. 8 differs for A and B"
        out[name] = sa
    return out


def top_per_group(scores: dict[str, float], groups: dict[str, str], n: int, exclude=()) -> set[str]:
    out = set()
    for group in set(groups.values()):
        members = sorted((name for name, g in groups.items() if g == group and name not in exclude),
                         key=lambda name: -scores[name])
        out |= set(members[:n])
    return out


@pytest.mark.parametrize("accumulate", ["run", "round"])
def test_mpor_chooses_the_top_layers_by_eq8_added_up_as_set(accumulate):
    """Alg. 2 lines 11-15 with Sec. 4.3's accumulation "throughout the fine-tuning process" (`run`): round 2 ranks
    by the scores summed from step 1. `round` (the earlier scheme): by steps 4-6 alone."""
    model = make("lora-over-mpor", TwoWidthNet, select_top_n=2, select_split=2, select_every=3,
                 select_accumulate=accumulate)
    groups = {u.layer: u.group for u in selector(model).units}
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    scores: dict[str, float] = dict.fromkeys(groups, 0.0)

    def observe(m):
        for name, score in eq8_by_autograd(m).items():
            scores[name] += score

    run(model, opt, range(3), observe)
    first = layers_with_cores(model)
    assert first == top_per_group(scores, groups, 1)
    if accumulate == "round":
        scores.update(dict.fromkeys(groups, 0.0))
    run(model, opt, range(3, 6), observe)
    second = layers_with_cores(model) - first
    assert second == top_per_group(scores, groups, 1, exclude=first)
    sel = selector(model)
    for k, unit in enumerate(sel.units):
        if unit.layer in second:
            assert float(sel.chosen_score[k]) == pytest.approx(scores[unit.layer], rel=1e-6)
            assert int(sel.chosen_step[k]) == 6


@pytest.mark.parametrize("method", ["lora-over-mpop", "lora-over-mpor"])
def test_schedule_ends_with_n_layers_per_group_and_the_optimizer_follows(method):
    model = make(method, TwoWidthNet)
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    _, events = run(model, opt, range(8))
    sel = selector(model)
    counts: dict[str, int] = {}
    for unit in sel.units:
        counts[unit.group] = counts.get(unit.group, 0) + (unit.layer in layers_with_cores(model))
    assert counts == {g: 2 for g in sel.groups}
    steps = sorted({e["step"] for e in events})
    # MPOP: all at once after its LoRA phase; MPOR: ceil(2 / 2) = 1 per group every 2 steps, two rounds.
    assert steps == ([2] if method == "lora-over-mpop" else [2, 4])
    assert {(e["layer"], e["matrix"]) for e in events} == {(name, "A and B") for name in layers_with_cores(model)}
    mpo = next(g for g in opt.param_groups if g["name"] == "mpo")
    cores = [p for m in model.modules() if isinstance(m, MPOWeight) for p in m.parameters()]
    n_groups = len(set(sel.groups))
    assert len(mpo["params"]) == len(cores) == n_groups * 2 * 2 * 3  # groups x N=2 layers x (A, B) x 3 cores
    assert all(any(p is c for p in mpo["params"]) for c in cores)
    frozen = [m.parametrizations.weight.original for m in model.modules() if hasattr(m, "parametrizations")]
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is f for f in frozen for p in in_opt)
    assert not any(p is f for f in frozen for p in opt.state)


def test_conversion_at_any_step_leaves_the_output_unchanged():
    model = make("lora-over-mpor", select_every=1000)
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    sel = selector(model)
    x, ctx, _ = batch(9)
    for step in range(4):
        run(model, opt, range(step + 1, step + 2))
        with torch.no_grad(), opdiff.materialize(model):
            before = model(x, ctx)
        sel.convert(model, step, opt)  # A and B of one layer, including B right after its first update
        with torch.no_grad(), opdiff.materialize(model):
            after = model(x, ctx)
        assert ((after - before).norm() / before.norm()).item() < 1e-5


# ------------------------------------------------------------------------------------------------------ MPOP


def eq7_by_hand(model, f) -> dict[str, float]:
    """|L_W - L_{W=0}| of every layer: its B zeroed by hand (zeroing A gives the same loss)."""
    base = f()
    out = {}
    for name, layer in lora_layers(model).items():
        b = layer.lora_B["default"].weight
        saved = b.detach().clone()
        with torch.no_grad():
            b.zero_()
        out[name] = abs(base - f())
        with torch.no_grad():
            b.copy_(saved)
    return out


def copy_lora(source, target) -> None:
    """Give `target`'s plain LoRA layers `source`'s A and B."""
    with torch.no_grad():
        for name, layer in lora_layers(source).items():
            mine = lora_layers(target)[name]
            mine.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            mine.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)


def test_mpop_scores_its_lora_phase_by_eq7_then_trains_the_chosen_structure_from_the_base():
    """Alg. 2 lines 4-8: LoRA, Eq. 7, top-N per group get MPO, then the fixed structure trains anew."""
    plain = make("lora", TwoWidthNet)  # what MPOP's LoRA phase trains: plain LoRA
    run(plain, torch.optim.AdamW(opdiff.param_groups(plain, lr=1e-2)), range(3))
    scores = eq7_by_hand(plain, eval_loss(plain))

    model = make("lora-over-mpop", TwoWidthNet, select_warmup_steps=3)
    groups = {u.layer: u.group for u in selector(model).units}
    initial_a = {n: layer.lora_A["default"].weight.detach().clone() for n, layer in lora_layers(model).items()}
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    run(model, opt, range(1))  # nothing is chosen at step 1; the optimizer now has state
    assert opt.state and not layers_with_cores(model)
    copy_lora(plain, model)  # the phase's end: score exactly the plain LoRA above
    events = opdiff.method_of(model).after_step(model, 3, opt, eval_loss(model))
    assert layers_with_cores(model) == top_per_group(scores, groups, 2)
    assert {e["layer"] for e in events} == layers_with_cores(model) and {e["step"] for e in events} == {3}
    for e in events:
        assert e["score"] == pytest.approx(scores[e["layer"]], rel=1e-9, abs=1e-12)
    # From the base again: B A = 0 everywhere (the output is the base's), a fresh A of PEFT's init, no moments.
    with torch.no_grad(), opdiff.materialize(model):
        for name, layer in lora_layers(model).items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            assert torch.count_nonzero(b) == 0, name
            bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert a.abs().max() <= bound * (1 + 1e-5) and a.abs().max() > 0.5 * bound
            assert not torch.allclose(a, initial_a[name]), f"{name}: A is a fresh draw, not the phase's init"
    assert len(opt.state) == 0
    x, ctx, _ = batch(9)
    base = make("lora", TwoWidthNet)  # same seed: the same base weights; B = 0
    with torch.no_grad(), opdiff.materialize(model):
        assert torch.equal(model(x, ctx), base(x, ctx))


def test_mpop_in_place_keeps_training_the_scored_lora():
    """`select_restart = false`: the chosen layers get cores of their trained values; the output is unchanged."""
    plain = make("lora", TwoWidthNet)
    run(plain, torch.optim.AdamW(opdiff.param_groups(plain, lr=1e-2)), range(3))
    twin = make("lora-over-mpop", TwoWidthNet, select_warmup_steps=3, select_restart=False)
    copy_lora(plain, twin)
    opt = torch.optim.AdamW(opdiff.param_groups(twin, lr=1e-2))
    x, ctx, _ = batch(9)
    with torch.no_grad(), opdiff.materialize(twin):
        before = twin(x, ctx)
    opdiff.method_of(twin).after_step(twin, 3, opt, eval_loss(twin))
    groups = {u.layer: u.group for u in selector(twin).units}
    assert layers_with_cores(twin) == top_per_group(eq7_by_hand(plain, eval_loss(plain)), groups, 2)
    with torch.no_grad(), opdiff.materialize(twin):
        assert ((twin(x, ctx) - before).norm() / before.norm()).item() < 1e-5


def save_lora(model, path, alpha: float | None, prefix: str = "unet.", header: str | None = "diffusers") -> None:
    """A LoRA file as diffusers (`unet.` keys, `lora_adapter_metadata`), opdiff (`opdiff_adapter`) or PEFT
    (`base_model.model.` keys) write it; `broken-opdiff`: an unreadable opdiff header next to a diffusers one."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{prefix}{name}.lora_A.weight"] = layer.lora_A["default"].weight.detach().contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = layer.lora_B["default"].weight.detach().contiguous()
    diffusers = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": alpha, "unet.r": 4})}
    metadata = {"diffusers": diffusers, "opdiff": {"opdiff_adapter": json.dumps({"alpha": alpha, "rank": 4})},
                "broken-opdiff": {"opdiff_adapter": "{not json", **diffusers}, None: None}[header]
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(("alpha", "header", "prefix"), [(4.0, "diffusers", "unet."), (8.0, "opdiff", "base_model.model."),
                                                       (8.0, "broken-opdiff", "unet."), (None, None, "unet.")])
def test_mpop_from_a_trained_lora_file_chooses_before_the_first_step(tmp_path, alpha, header, prefix):
    """Alg. 2 as the paper runs it: a LoRA trained elsewhere is scored by Eq. 7; the run starts from the base."""
    trained = make("lora", TwoWidthNet, alpha=alpha or 4.0)
    run(trained, torch.optim.AdamW(opdiff.param_groups(trained, lr=1e-2)), range(4))
    save_lora(trained, tmp_path / "lora.safetensors", alpha, prefix, header)
    scores = eq7_by_hand(trained, eval_loss(trained))  # the file's effect is alpha / 4 * B A (1 * B A without alpha)
    model = make("lora-over-mpop", TwoWidthNet, select_from=tmp_path, alpha=2.0)
    groups = {u.layer: u.group for u in selector(model).units}
    initial = {n: (layer.lora_A["default"].weight.detach().clone()) for n, layer in lora_layers(model).items()}
    if alpha is None:
        with torch.no_grad():  # a file without alpha has scale 1: score that effect
            for layer in lora_layers(trained).values():
                layer.lora_B["default"].weight.mul_(1 / layer.scaling["default"])
        scores = eq7_by_hand(trained, eval_loss(trained))
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    _, events = run(model, opt, range(2))
    assert {e["step"] for e in events} == {0} and selector(model).done()
    assert all(set(e) == {"step", "group", "layer", "matrix", "score"} for e in events)
    chosen = layers_with_cores(model)
    assert chosen == top_per_group(scores, groups, 2)
    for e in events:
        assert e["score"] == pytest.approx(scores[e["layer"]], rel=1e-6, abs=1e-12)
    # The cores train (the optimizer has them) and are contracted in banks, one per core layout.
    cores = [p for m in model.modules() if isinstance(m, MPOWeight) for p in m.parameters()]
    (mpo,) = [g for g in opt.param_groups if g["name"] == "mpo"]
    assert {id(p) for p in mpo["params"]} == {id(p) for p in cores} and all(p in opt.state for p in cores)
    assert any(key.startswith("mpo_") for key in model.opdiff)
    # A checkpoint of it loads into a fresh model, and again into the same one.
    state = opdiff.training_state_dict(model)
    resumed = make("lora-over-mpop", TwoWidthNet, select_from=tmp_path, alpha=2.0)
    for _ in range(2):
        opdiff.load_training_state_dict(resumed, state)
        assert layers_with_cores(resumed) == chosen
        assert any(key.startswith("mpo_") for key in resumed.opdiff), "restored cores join their bank"
    fresh = make("lora-over-mpop", TwoWidthNet, select_from=tmp_path, alpha=2.0)
    with torch.no_grad(), opdiff.materialize(fresh):
        opdiff.method_of(fresh).before_training(fresh, None, eval_loss(fresh))
        for name, layer in lora_layers(fresh).items():  # the adapter keeps its own fresh init
            assert torch.allclose(layer.lora_A["default"].weight, initial[name], atol=1e-6)
            assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_mpop_from_a_file_refuses_a_mismatch_naming_the_file(tmp_path):
    trained = make("lora", TwoWidthNet, rank=2)
    save_lora(trained, tmp_path / "r2.safetensors", 2.0)
    model = make("lora-over-mpop", TwoWidthNet, select_from=tmp_path / "r2.safetensors")
    with pytest.raises(ValueError, match=r"r2\.safetensors has .*lora_A\.weight of shape \(2, 12\).*--rank 4"):
        opdiff.method_of(model).before_training(model, None, eval_loss(model))
    model = make("lora-over-mpop", TwoWidthNet, select_from=tmp_path / "missing")
    with pytest.raises(ValueError, match="missing does not exist"):
        opdiff.method_of(model).before_training(model, None, eval_loss(model))
    other = make("lora", TwoWidthNet, target_modules=("to_q",))
    save_lora(other, tmp_path / "q.safetensors", 4.0)
    model = make("lora-over-mpop", TwoWidthNet, select_from=tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match=r"q\.safetensors has no .*to_k\.lora_A\.weight: .*"
                                         r"\(targets to_q, to_k, to_v, to_out\.0\)"):
        opdiff.method_of(model).before_training(model, None, eval_loss(model))
    (tmp_path / "damaged.safetensors").write_bytes(b"not a safetensors file")
    model = make("lora-over-mpop", TwoWidthNet, select_from=tmp_path / "damaged.safetensors")
    with pytest.raises(ValueError, match=r"cannot read .*damaged\.safetensors as a safetensors LoRA"):
        opdiff.method_of(model).before_training(model, None, eval_loss(model))
    dora = make("dora", TwoWidthNet)
    save_file({k: v.contiguous() for k, v in opdiff.training_state_dict(dora).items()},
              str(tmp_path / "dora.safetensors"))
    model = make("lora-over-mpop", TwoWidthNet, select_from=tmp_path / "dora.safetensors")
    with pytest.raises(ValueError, match=r"dora\.safetensors is a DoRA; Eq\. 7 scores a plain LoRA"):
        opdiff.method_of(model).before_training(model, None, eval_loss(model))
    model = make("lora-over-mpop", TwoWidthNet, select_from=tmp_path)  # a folder without lora.safetensors
    with pytest.raises(ValueError, match=r"lora\.safetensors does not exist; give a finished LoRA run's folder or "
                                         r"its lora\.safetensors"):
        opdiff.method_of(model).before_training(model, None, eval_loss(model))


def test_eq7_scores_match_zeroing_by_hand():
    model = make("lora-over-mpop", select_warmup_steps=1000)
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    run(model, opt, range(3))
    sel = selector(model)
    f = eval_loss(model)
    base = f()
    scores = sel._loss_scores(model, f)
    assert f() == base, "scoring must restore every matrix"
    by_hand = eq7_by_hand(model, f)
    for k, unit in enumerate(sel.units):
        assert scores[k].item() == pytest.approx(by_hand[unit.layer], rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------------------------ both


@pytest.mark.parametrize("method", ["lora-over-mpop", "lora-over-mpor"])
@pytest.mark.parametrize("legacy", [False, True], ids=["paper", "earlier"])
def test_resume_after_a_selection_restores_it(method, legacy):
    kw = LEGACY if legacy else {}
    model = make(method, **kw)
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    full, _ = run(model, opt, range(8))

    first = make(method, **kw)
    opt1 = torch.optim.AdamW(opdiff.param_groups(first, lr=1e-2))
    head, _ = run(first, opt1, range(3))  # stops after the first selection
    state, opt_state = opdiff.training_state_dict(first), opt1.state_dict()

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = opdiff.inject(TinyNet(), first.opdiff_config)
    resumed.load_state_dict({k: v for k, v in first.state_dict().items() if "lora" not in k and "opdiff" not in k},
                            strict=False)
    opdiff.load_training_state_dict(resumed, state)
    assert layers_with_cores(resumed) == layers_with_cores(first) if not legacy else True
    opt2 = torch.optim.AdamW(opdiff.param_groups(resumed, lr=1e-2))
    opt2.load_state_dict(opt_state)
    tail, _ = run(resumed, opt2, range(3, 8))
    assert head + tail == pytest.approx(full, rel=1e-6)


def test_earlier_grouping_ranks_each_matrix_alone():
    """`select_groups = suffix-and-matrix`: groups of module kind x A/B, each matrix its own unit."""
    sel = selector(make("lora-over-mpor", **LEGACY))
    layers = list(lora_layers(make("lora")))
    assert [(u.layer, u.matrices) for u in sel.units] == [(n, (m,)) for n in layers for m in "AB"]
    assert {u.group for u in sel.units} == {f"{k}/{m}" for k in ("to_q", "to_k", "to_v", "to_out.0") for m in "AB"}


def test_saved_configs_without_the_new_settings_mean_the_earlier_selection():
    saved = opdiff.AdapterConfig(method="lora-over-mpor", select_top_n=2).to_dict()
    for key in ("select_groups", "select_accumulate", "select_restart", "select_fraction", "select_from"):
        del saved[key]
    config = opdiff.AdapterConfig.from_saved(saved)
    assert (config.select_groups, config.select_accumulate, config.select_restart) == (
        "suffix-and-matrix", "round", False)
    assert config.select_top_n == 2


def test_checkpoint_mismatch_is_named():
    model = make("lora-over-mpor")
    state = opdiff.training_state_dict(model)
    del state["opdiff.select.chosen_step"]
    with pytest.raises(ValueError, match="lacks the selection state 'opdiff.select.chosen_step'"):
        opdiff.load_training_state_dict(make("lora-over-mpor"), state)
    with pytest.raises(ValueError, match="does not match this adapter"):
        opdiff.load_training_state_dict(make("lora"), opdiff.training_state_dict(make("op-lora")))


def test_custom_param_groups_keep_each_parameter_in_exactly_one_group():
    """A user's own groups (here the LoRA matrices split in two) survive conversions: none gains another's."""
    model = make("lora-over-mpor", TwoWidthNet, select_top_n=1)
    adapter, mpo = opdiff.param_groups(model, lr=1e-2)
    half = len(adapter["params"]) // 2
    opt = torch.optim.AdamW([{**adapter, "params": adapter["params"][:half]},
                             {"params": adapter["params"][half:], "lr": 5e-3, "name": "slower"}, mpo])
    run(model, opt, range(8))
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len(set(in_opt)), "a parameter sits in two groups"
    assert set(in_opt) == {id(p) for p in model.parameters() if p.requires_grad}
    assert opt.param_groups[1]["lr"] == 5e-3 and 0 < len(opt.param_groups[1]["params"]) <= len(adapter["params"]) - half


def test_schedule_warnings_name_the_setting_to_change(tmp_path):
    mpor, mpop = opdiff.METHODS["lora-over-mpor"], opdiff.METHODS["lora-over-mpop"]
    config = opdiff.AdapterConfig(method="lora-over-mpor", select_every=50, select_split=8)
    assert mpor.schedule_warning(config, 400) is None  # 8 rounds of 50 steps fit
    assert "--select-every" in mpor.schedule_warning(config, 399)
    config = opdiff.AdapterConfig(method="lora-over-mpop", select_warmup_steps=100)
    assert mpop.schedule_warning(config, 101) is None
    assert "--select-warmup-steps" in mpop.schedule_warning(config, 100)  # no step left for the restarted adapter
    assert mpop.schedule_warning(config.replace(select_from=tmp_path), 1) is None  # scored before the first step


@pytest.mark.parametrize("method", ["lora-over-mpop", "lora-over-mpor"])
def test_the_chosen_layers_get_cores_in_the_chosen_gauge(method):
    """`mpo_gauge = left` (lora-over.txt Alg. 1): every core but the last is a left isometry."""
    model = make(method, TwoWidthNet, mpo_gauge="left", select_warmup_steps=1, select_every=1, select_split=1)
    run(model, torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2)), range(1))
    chosen = [m for m in model.modules() if isinstance(m, MPOWeight)]
    assert chosen
    for weight in chosen:
        for core in list(weight.cores)[:-1]:
            u = core.detach().double().reshape(-1, core.shape[-1])  # (d_{k-1} i_k j_k, d_k)
            live = u.norm(dim=0) > 0.5  # bonds beyond the matrix's rank are zero columns
            gram = u[:, live].T @ u[:, live]
            assert torch.allclose(gram, torch.eye(int(live.sum()), dtype=torch.float64), atol=1e-5)


def test_misuse_is_refused_with_a_reason():
    model = make("lora-over-mpop", select_warmup_steps=1)
    with pytest.raises(ValueError, match=r"^lora-over-mpop needs probe_loss to score layers by Eq\. 7$"):
        selector(model).step(model, 1, None, None)
    model = make("lora-over-mpor")
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # no "mpo" group
    with pytest.raises(ValueError, match=r"^optimizer has no 'mpo' param group: build it with "
                                         r"opdiff\.param_groups\(model, lr\)$"):
        selector(model).convert(model, 0, plain)


def test_mpor_rounds_never_choose_more_than_n():
    """N = 3 in 2 rounds: 2 in the first, the 1 left in the second (Alg. 2: until N per group)."""
    model = make("lora-over-mpor", TwelveLayerNet, select_top_n=3, select_split=2, select_every=1)
    run(model, torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2)), range(4))
    sel = selector(model)
    per_round = {}
    for k, unit in enumerate(sel.units):
        if sel.chosen_step[k] >= 0:
            per_round.setdefault(unit.group, []).append(int(sel.chosen_step[k]))
    assert {g: sorted(steps) for g, steps in per_round.items()} == {g: [1, 1, 2] for g in set(sel.groups)}
    assert sel.done()


def test_earlier_grouping_gives_cores_to_the_chosen_matrix_only():
    """`select_groups = suffix-and-matrix`: a unit is one matrix, and only that matrix gets cores."""
    model = make("lora-over-mpor", **LEGACY)
    sel = selector(model)
    for k in (0, 3):  # the first layer's A, the second layer's B
        sel.convert(model, k, None)
    first, second = list(lora_layers(model).values())[:2]
    assert has_cores(first.lora_A["default"]) and not has_cores(first.lora_B["default"])
    assert has_cores(second.lora_B["default"]) and not has_cores(second.lora_A["default"])
    model = make("lora-over-mpor", **LEGACY, select_top_n=1, select_split=1, select_every=2)
    _, events = run(model, torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2)), range(2))
    assert events
    for e in events:
        layer = lora_layers(model)[e["layer"]]
        mine, other = (layer.lora_A, layer.lora_B) if e["matrix"] == "A" else (layer.lora_B, layer.lora_A)
        assert has_cores(mine["default"])
        assert not has_cores(other["default"]) or any(
            f["layer"] == e["layer"] and f["matrix"] != e["matrix"] for f in events)


def test_layers_outside_attention_are_grouped_by_kind_and_shape():
    sel = selector(make("lora-over-mpor"))  # TinyNet: blocks.N.to_q, no attn1 / attn2 in the names
    assert {u.group for u in sel.units} == {f"{kind}/other/{shape}" for kind, shapes in (
        ("to_q", ("12x12", "20x20")), ("to_k", ("12x10", "20x10")), ("to_v", ("12x10", "20x10")),
        ("to_out.0", ("12x12", "20x20"))) for shape in shapes}


@pytest.mark.parametrize("method", ["lora-over-mpop", "lora-over-mpor"])
def test_once_every_layer_has_cores_the_adapter_group_stays_empty(method):
    """A saved optimizer state always has both groups, so a run whose every layer got cores resumes."""
    model = make(method, select_warmup_steps=1, select_every=1, select_split=1, select_fraction=1.0,
                 select_top_n=None)
    run(model, torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2)), range(1))
    assert len(layers_with_cores(model)) == len(lora_layers(model))
    adapter, mpo = opdiff.method_of(model).param_groups(model, 0.5)  # the hook itself, its default arguments
    assert (adapter["params"], adapter["lr"], adapter["name"], mpo["name"]) == ([], 0.5, "adapter", "mpo")


def test_scores_add_up_in_float64():
    """Eq. 8 is added every step of a run: float64 keeps a long run's sum from float32 rounding."""
    sel = selector(make("lora-over-mpor"))
    assert sel.scores.dtype == sel.chosen_score.dtype == torch.float64
