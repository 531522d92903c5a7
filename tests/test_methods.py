"""Every method on a small MLP: step 0 equals the base, exact collapse, gradients reach every parameter."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

import opdiff

METHODS = list(opdiff.METHODS)


class TinyAttention(nn.Module):
    """A module tree with the SDXL projection names, shaped like attention projections of two widths."""

    def __init__(self, d: int, d_ctx: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(d_ctx, d, bias=False)
        self.to_v = nn.Linear(d_ctx, d, bias=False)
        self.to_out = nn.Sequential(nn.Linear(d, d), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)  # (B, T, d), (B, S, d)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)  # (B, T, S)
        return self.to_out(att @ v)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TinyAttention(12, 10), TinyAttention(12, 10), TinyAttention(20, 10)])
        self.proj = nn.Linear(12, 20)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.blocks[0](x, ctx)
        x = x + self.blocks[1](x, ctx)
        x = self.proj(x)
        return x + self.blocks[2](x, ctx)


def make(method: str, **kw) -> tuple[TinyNet, TinyNet]:
    """Return (base, adapted) with identical base weights."""
    torch.manual_seed(0)
    base = TinyNet()
    adapted = TinyNet()
    adapted.load_state_dict(base.state_dict())
    opdiff.inject(adapted, opdiff.AdapterConfig(method=method, rank=4, alpha=kw.pop("alpha", 4.0), mpo_cores=3, **kw))
    return base, adapted


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 12, generator=g), torch.randn(3, 7, 10, generator=g), torch.randn(3, 5, 20, generator=g)


def train(model: nn.Module, steps: int, lr: float = 1e-2) -> list[dict[str, torch.Tensor]]:
    """Train a few AdamW steps; return each step's gradients by parameter name."""
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=lr))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = []
    for step in range(steps):
        x, ctx, y = batch(step)
        with opdiff.materialize(model):
            loss = torch.nn.functional.mse_loss(model(x, ctx), y)
            loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in named.items()})
        opt.step()
        opt.zero_grad()
    return grads


@pytest.mark.parametrize("method", METHODS)
def test_step0_equals_base(method):
    base, adapted = make(method)
    x, ctx, _ = batch()
    with torch.no_grad(), opdiff.materialize(adapted):
        diff = (adapted(x, ctx) - base(x, ctx)).abs().max().item()
    assert diff < 1e-6
    # Outside `materialize` the functions are evaluated on every access: same value.
    with torch.no_grad():
        assert (adapted(x, ctx) - base(x, ctx)).abs().max().item() < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient_within_3_steps(method):
    _, adapted = make(method)
    grads = train(adapted, steps=3)
    assert grads[0], "no trainable parameters"
    silent = [n for n in grads[0] if all(torch.count_nonzero(g[n]) == 0 for g in grads)]
    assert not silent, f"parameters that never received a gradient: {silent}"


@pytest.mark.parametrize("method", METHODS)
def test_collapse_is_exact_and_leaves_only_peft_tensors(method):
    base, adapted = make(method, alpha=8.0)  # alpha != rank: the scale must survive collapse
    train(adapted, steps=4)
    x, ctx, _ = batch(7)
    with torch.no_grad(), opdiff.materialize(adapted):
        before = adapted(x, ctx)
    assert (before - base(x, ctx)).abs().max() > 1e-4, "training did not change the model"
    opdiff.collapse(adapted)
    with torch.no_grad():
        after = adapted(x, ctx)
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    keys = list(adapted.state_dict())
    assert not [k for k in keys if "parametrizations" in k or k.startswith("opdiff.")]
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    want = ("lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight")
    assert trainable and all(n.endswith(want) for n in trainable), trainable
    dora = opdiff.METHODS[method].use_dora
    assert any("lora_magnitude_vector" in n for n in trainable) == dora


@pytest.mark.parametrize("method", METHODS)
def test_base_weights_are_frozen_and_unchanged(method):
    base, adapted = make(method)
    train(adapted, steps=2)
    adapted_base = {n: p for n, p in adapted.named_parameters() if "lora_" not in n and "opdiff." not in n}
    assert adapted_base
    for name, p in adapted_base.items():
        assert not p.requires_grad or "parametrizations" in name, name
    for name, p in base.named_parameters():
        peft_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        target = adapted.get_submodule(name.rsplit(".", 1)[0])
        tensor = getattr(target.base_layer if isinstance(target, LoraLayer) else target, name.rsplit(".", 1)[1])
        assert torch.equal(tensor, p), peft_name


def test_targets_and_groups():
    _, adapted = make("lora-over-mpo", mpo_lr=5e-3)
    layers = opdiff.adapted_layers(adapted)
    assert len(layers) == 12
    assert sorted({a.kind for a in layers}) == ["to_k", "to_out.0", "to_q", "to_v"]
    groups = {g["name"]: g for g in opdiff.param_groups(adapted, lr=1e-3)}
    assert set(groups) == {"mpo"} and groups["mpo"]["lr"] == 5e-3


@pytest.mark.parametrize(("method", "cores"), [("lora-over-svd", 2), ("lora-over-mpo", 3), ("lora-over-mpor", 3)])
def test_cores_learn_at_lr_over_m_to_the_power_unless_set(method, cores):
    """No mpo_lr: the cores' rate is min(lr / m^mpo_lr_power, mpo_lr_cap / m^2), by default min(lr, 1e-2 / m^2);
    power 0 without a limit is the paper's rate (MPO_LR = LR)."""
    for settings, lr, expected in (({}, 1e-3, 1e-3), ({}, 3e-2, 1e-2 / cores**2),
                                   ({"mpo_lr_cap": 0.0}, 3e-2, 3e-2), ({"mpo_lr_power": 1.0}, 1e-3, 1e-3 / cores),
                                   ({"mpo_lr_power": 1.5, "mpo_lr_cap": 0.0}, 1e-2, 1e-2 / cores**1.5)):
        _, adapted = make(method, **settings)
        (mpo,) = [g for g in opdiff.param_groups(adapted, lr=lr) if g["name"] == "mpo"]
        assert mpo["lr"] == pytest.approx(expected, rel=1e-12), (settings, lr, mpo["lr"])


@pytest.mark.parametrize(("method", "cores"), [("lora-over-svd", 2), ("lora-over-mpo", 3), ("lora-over-mpor", 3)])
def test_an_optimizer_that_finds_its_own_step_trains_every_group_at_its_lr_multiplier(method, cores):
    """`relative=True` (Prodigy: lr ~ 1 multiplies its own step size): the cores' absolute limit does not apply;
    a core rate the user set still does."""
    _, adapted = make(method)
    assert {g["lr"] for g in opdiff.param_groups(adapted, lr=1.0, relative=True)} == {1.0}
    hook = opdiff.method_of(adapted).param_groups(adapted, 1.0)  # the hook's own default: an absolute lr
    assert min(g["lr"] for g in hook) == pytest.approx(1e-2 / cores**2)
    assert min(g["lr"] for g in opdiff.param_groups(adapted, lr=1.0)) == pytest.approx(1e-2 / cores**2)
    _, adapted = make(method, mpo_lr=0.5)
    (mpo,) = [g for g in opdiff.param_groups(adapted, lr=1.0, relative=True) if g["name"] == "mpo"]
    assert mpo["lr"] == 0.5


@pytest.mark.parametrize("method", ["lora-over-svd", "lora-over-mpo"])
def test_mpo_gauge_reaches_every_matrix(method):
    """mpo_gauge="left" (Alg. 1): every core of A and B but the last is a left isometry over its
    (d_{k-1} i_k j_k, d_k) reshape; the default (symmetric) gauge's first core of A is not."""
    for gauge in ("left", None):
        _, adapted = make(method, **({} if gauge is None else {"mpo_gauge": gauge}))
        for a in opdiff.adapted_layers(adapted):
            for lin in (a.lora_A, a.lora_B):
                cores = [c.detach().double() for c in lin.parametrizations.weight[0].cores]
                grams = [c.reshape(-1, c.shape[-1]).T @ c.reshape(-1, c.shape[-1]) for c in cores[:-1]]
                isometric = [torch.allclose(g, torch.eye(len(g), dtype=g.dtype), atol=1e-5) for g in grams]
                if gauge == "left":
                    assert all(isometric), (a.name, isometric)
                elif lin is a.lora_A:
                    assert not isometric[0], a.name


def test_op_lora_generates_once_per_step_in_one_batch_per_shape():
    _, adapted = make("op-lora")
    generators = list(adapted.opdiff.values())
    # shapes: (12 -> 12) q/out in blocks 0-1, (10 -> 12) k/v in blocks 0-1, (20 -> 20), (10 -> 20): 4 classes
    assert len(generators) == 4
    calls = []
    for g in generators:
        original = g.compute
        g.compute = lambda original=original: calls.append(1) or original()
    x, ctx, _ = batch()
    with opdiff.materialize(adapted):
        adapted(x, ctx)
        adapted(x, ctx)
    assert len(calls) == 4


def test_errors_name_the_bad_setting():
    with pytest.raises(ValueError, match="unknown method 'op-lorax'"):
        opdiff.AdapterConfig(method="op-lorax")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        opdiff.AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="unknown setting.*rnak"):
        opdiff.AdapterConfig.from_dict({"method": "lora", "rnak": 4})
    with pytest.raises(ValueError, match="no module matches target_modules"):
        opdiff.inject(TinyNet(), opdiff.AdapterConfig(target_modules=("nothing_here",)))
    _, adapted = make("lora")
    with pytest.raises(ValueError, match="already carries an opdiff adapter"):
        opdiff.inject(adapted, opdiff.AdapterConfig())


@pytest.mark.parametrize("method", ["lora-over-svd", "lora-over-mpo"])
def test_lora_over_contracts_once_per_step_per_core_layout(method):
    _, adapted = make(method)
    banks = list(adapted.opdiff.values())
    # A: (4 x 12), (4 x 10), (4 x 20); B: (12 x 4), (20 x 4): one bank per layout, every matrix in one
    assert len(banks) == 5 and sum(len(b.members) for b in banks) == 24
    calls = []
    for b in banks:
        b.compute = lambda original=b.compute: calls.append(1) or original()
    x, ctx, _ = batch()
    with opdiff.materialize(adapted):
        adapted(x, ctx)
        adapted(x, ctx)
    assert len(calls) == 5


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_the_base_and_allows_another_method(method):
    base, adapted = make(method)
    train(adapted, steps=2)
    opdiff.remove(adapted)
    assert not any(isinstance(m, LoraLayer) for m in adapted.modules())
    assert set(adapted.state_dict()) == set(base.state_dict())
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in base.state_dict().items())
    assert opdiff.adapted_layers(adapted) == []
    opdiff.inject(adapted, opdiff.AdapterConfig(method="op-lora", target_modules=("to_q",)))
    # the list `inject` keeps is the new model's, the same as walking its modules
    walked = [(n, m) for n, m in adapted.named_modules() if isinstance(m, LoraLayer)]
    assert [(a.name, a.layer) for a in opdiff.adapted_layers(adapted)] == walked and walked
    x, ctx, _ = batch()
    with torch.no_grad(), opdiff.materialize(adapted):
        assert (adapted(x, ctx) - base(x, ctx)).abs().max().item() < 1e-6


@pytest.mark.parametrize("method", [m for m in METHODS if opdiff.METHODS[m].use_dora])
def test_dora_layers_keep_no_identity_for_backward_and_train_the_same(method):
    """opdiff's DoRA layer computes the row norm without forming B A: the same outputs and gradients as PEFT's own
    layer, and the backward no longer holds a (d_in, d_in) identity per layer."""
    from peft.tuners.lora.dora import DoraLinearLayer

    from opdiff.inject import DoraLayer

    def run(stock: bool) -> tuple[list[dict[str, torch.Tensor]], int]:
        with pytest.MonkeyPatch.context() as patch:
            if stock:  # PEFT's own product, graph and all
                patch.setattr(DoraLayer, "forward", DoraLinearLayer.forward)
            return _run()

    def _run() -> tuple[list[dict[str, torch.Tensor]], int]:
        _, adapted = make(method)
        layers = opdiff.adapted_layers(adapted)
        assert all(isinstance(a.magnitude, DoraLayer) for a in layers)
        stock = DoraLayer.forward is DoraLinearLayer.forward
        saved = []
        x, ctx, _ = batch()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            with opdiff.materialize(adapted):
                adapted(x, ctx).square().mean()
        eye = sum(a.lora_A.weight.shape[1] ** 2 for a in layers)
        return train(adapted, steps=3), sum(saved) - (eye if stock else 0)

    (ours, ours_saved), (peft, peft_saved_less_eye) = run(stock=False), run(stock=True)
    assert ours_saved <= peft_saved_less_eye  # exactly the identities are gone
    for step_ours, step_peft in zip(ours, peft, strict=True):
        for name, grad in step_peft.items():
            torch.testing.assert_close(step_ours[name], grad, rtol=1e-6, atol=1e-7)


def test_to_mpo_without_a_bank_keeps_the_value_and_contracts_on_each_access():
    from opdiff.methods.lora_over import to_mpo

    torch.manual_seed(0)
    for weight in (torch.randn(4, 12), torch.zeros(12, 4)):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight)
        function = to_mpo(linear, 3)  # no `banks`: the matrix contracts its own cores
        assert function.bank is None and len(function.cores) == 3
        torch.testing.assert_close(linear.weight, weight, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            function.cores[-1].add_(1.0)
        assert not torch.allclose(linear.weight, weight)


def test_meta_device_cores_have_the_shapes_of_real_ones():
    """bench/methods.py counts parameters of a full-size model built on the meta device: same cores, no values."""
    config = opdiff.AdapterConfig(method="lora-over-mpo", rank=4, mpo_cores=5)
    meta = opdiff.inject(TinyNet().to("meta"), config)  # not under `torch.device("meta")`: cores must say meta
    real = opdiff.inject(TinyNet(), config)
    for a_meta, a_real in zip(opdiff.adapted_layers(meta), opdiff.adapted_layers(real), strict=True):
        for lin_meta, lin_real in ((a_meta.lora_A, a_real.lora_A), (a_meta.lora_B, a_real.lora_B)):
            cores_meta = list(lin_meta.parametrizations.weight[0].cores)
            cores_real = list(lin_real.parametrizations.weight[0].cores)
            assert [c.shape for c in cores_meta] == [c.shape for c in cores_real]
            assert all(c.is_meta for c in cores_meta)


@pytest.mark.parametrize("method", METHODS)
def test_a_float64_model_gets_float64_adapter_state(method):
    torch.manual_seed(0)
    base = TinyNet().double()
    adapted = TinyNet().double()
    adapted.load_state_dict(base.state_dict())
    opdiff.inject(adapted, opdiff.AdapterConfig(method=method, rank=4, mpo_cores=3))
    assert {p.dtype for p in opdiff.trainable_parameters(adapted)} == {torch.float64}
    x, ctx, _ = (t.double() for t in batch())
    with torch.no_grad(), opdiff.materialize(adapted):
        out = adapted(x, ctx)
    assert out.dtype == torch.float64 and (out - base(x, ctx)).abs().max().item() < 1e-12


@pytest.mark.parametrize("method", ["op-lora", "lora-over-mpo"])
def test_outside_materialize_a_changed_parameter_shows_at_once(method):
    """Nothing is cached outside `materialize`, also before its first use."""
    _, adapted = make(method)
    layer = opdiff.adapted_layers(adapted)[0]
    before = layer.lora_A.weight.detach().clone()
    with torch.no_grad():
        for p in opdiff.trainable_parameters(adapted):
            p.mul_(1.5)
    assert not torch.allclose(layer.lora_A.weight, before)
