"""LoRA-Over-MPOP and -MPOR selection (lora-over.txt Sec. 4.3, Eq. 7, Eq. 8, Alg. 2) on a small model."""

from __future__ import annotations

import pytest
import torch
from test_methods import TinyNet, batch

import opdiff
from opdiff.methods.lora_over import MPOWeight


def make(method: str, **kw) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
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


def run(model, optimizer, steps: range) -> tuple[list[float], list[dict]]:
    """The training loop every pipeline uses, in miniature, with the method's hooks; returns losses and events."""
    method = opdiff.method_of(model)
    losses, events = [], []
    for step in steps:
        with opdiff.materialize(model):
            loss = loss_on(model, step)
            loss.backward()
        method.after_backward(model, step + 1)
        optimizer.step()
        optimizer.zero_grad()
        events += method.after_step(model, step + 1, optimizer, eval_loss(model))
        losses.append(loss.item())
    return losses, events


def selector(model):
    """The selection state the MPOP/MPOR methods keep under `model.opdiff`."""
    return model.opdiff["select"]


def n_mpo_per_group(model) -> dict[str, int]:
    sel = selector(model)
    counts: dict[str, int] = {}
    for k, group in enumerate(sel.groups):
        counts[group] = counts.get(group, 0) + int(hasattr(sel.matrix(model, k), "parametrizations"))
    return counts


@pytest.mark.parametrize("method", ["lora-over-mpop", "lora-over-mpor"])
def test_schedule_ends_with_exactly_n_mpo_matrices_per_group(method):
    model = make(method)
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    _, events = run(model, opt, range(8))
    assert n_mpo_per_group(model) == {g: 2 for g in selector(model).groups}
    steps = sorted({e["step"] for e in events})
    # MPOP: all at once after warm-up; MPOR: ceil(2 / 2) = 1 per group every 2 steps, two rounds.
    assert steps == ([2] if method == "lora-over-mpop" else [2, 4])
    def order(rows):
        return sorted(rows, key=lambda r: (r["step"], r["group"], r["layer"], r["matrix"]))

    sel = selector(model)
    chosen = [{"step": int(sel.chosen_step[k]), "group": sel.groups[k], "layer": sel.layer_names[k // 2],
               "matrix": "AB"[k % 2], "score": float(sel.chosen_score[k])}
              for k in range(len(sel.groups)) if sel.chosen_step[k] >= 0]
    assert order(chosen) == order(events)
    mpo = next(g for g in opt.param_groups if g["name"] == "mpo")
    cores = [p for m in model.modules() if isinstance(m, MPOWeight) for p in m.parameters()]
    assert len(mpo["params"]) == len(cores) == 8 * 2 * 3  # 8 groups x N=2 x 3 cores
    assert all(any(p is c for p in mpo["params"]) for c in cores)
    # Converted tensors left the optimizer with their state.
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
        run(model, opt, range(step, step + 1))
        with torch.no_grad(), opdiff.materialize(model):
            before = model(x, ctx)
        for k in (2 * step, 2 * step + 1):  # an A and a B, including B right after its first update
            sel.convert(model, k, opt)
        with torch.no_grad(), opdiff.materialize(model):
            after = model(x, ctx)
        assert ((after - before).norm() / before.norm()).item() < 1e-5


def test_eq8_scores_match_autograd():
    model = make("lora-over-mpor", select_every=1000)
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    run(model, opt, range(2))  # so that B != 0
    sel = selector(model)
    sel.scores.zero_()
    mats = [sel.matrix(model, k).weight for k in range(len(sel.groups))]
    grads = torch.autograd.grad(loss_on(model, 5), mats)
    want = torch.stack([(g.double() * w.detach().double()).sum().abs() for g, w in zip(grads, mats, strict=True)])
    with opdiff.materialize(model):
        loss_on(model, 5).backward()
    sel.observe(model)
    assert torch.allclose(sel.scores, want, rtol=1e-6, atol=1e-12)
    assert (want > 0).all()


def test_eq7_scores_match_zeroing_by_hand():
    model = make("lora-over-mpop", select_warmup_steps=1000)
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    run(model, opt, range(3))
    sel = selector(model)
    f = eval_loss(model)
    scores = sel._loss_scores(model, f)
    base = f()
    for k in (0, 1, 7, 22):
        w = sel.matrix(model, k).weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.zero_()
        by_hand = abs(base - f())
        with torch.no_grad():
            w.copy_(saved)
        assert scores[k].item() == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
    assert f() == base, "scoring must restore every matrix"


@pytest.mark.parametrize("method", ["lora-over-mpop", "lora-over-mpor"])
def test_resume_after_a_selection_restores_it(method):
    model = make(method)
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=1e-2))
    full, _ = run(model, opt, range(8))

    first = make(method)
    opt1 = torch.optim.AdamW(opdiff.param_groups(first, lr=1e-2))
    head, _ = run(first, opt1, range(3))  # stops after the first selection
    state, opt_state = opdiff.training_state_dict(first), opt1.state_dict()

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = opdiff.inject(TinyNet(), first.opdiff_config)
    resumed.load_state_dict({k: v for k, v in first.state_dict().items() if "lora" not in k and "opdiff" not in k},
                            strict=False)
    opdiff.load_training_state_dict(resumed, state)
    assert n_mpo_per_group(resumed) == n_mpo_per_group(first)
    opt2 = torch.optim.AdamW(opdiff.param_groups(resumed, lr=1e-2))
    opt2.load_state_dict(opt_state)
    tail, _ = run(resumed, opt2, range(3, 8))
    assert head + tail == pytest.approx(full, rel=1e-6)


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
    model = make("lora-over-mpor")
    adapter, mpo = opdiff.param_groups(model, lr=1e-2)
    half = len(adapter["params"]) // 2
    opt = torch.optim.AdamW([{**adapter, "params": adapter["params"][:half]},
                             {"params": adapter["params"][half:], "lr": 5e-3, "name": "slower"}, mpo])
    run(model, opt, range(8))
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len(set(in_opt)), "a parameter sits in two groups"
    assert set(in_opt) == {id(p) for p in model.parameters() if p.requires_grad}
    assert opt.param_groups[1]["lr"] == 5e-3 and 0 < len(opt.param_groups[1]["params"]) <= len(adapter["params"]) - half
