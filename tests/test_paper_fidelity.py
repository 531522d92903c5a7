"""The methods against the papers, with every expected value computed here from the papers' own formulas.

op-lora.txt Eq. 4 and App. C.1 (the generator and its initialisation), lora-over.txt Eq. 3, 4, 6 and Tables 5
and 7 (the MPO cores), and the collapse into the plain LoRA of Eq. 2 (lora-over.txt; op-lora.txt Eq. 1). Nothing
here calls opdiff's own contraction, factorization or bond rule to obtain an expected value: the oracles below
are written from the papers' text.
"""

from __future__ import annotations

import math
import string

import pytest
import torch
from test_methods import TinyNet
from torch import nn

import opdiff
from opdiff import mpo

pytestmark = pytest.mark.usefixtures("single_thread")

OP_METHODS = ["op-lora", "op-dora"]
MPO_METHODS = ["lora-over-svd", "lora-over-mpo"]


# ---------------------------------------------------------------------------------------------------------------
# Oracles, from the papers' text
# ---------------------------------------------------------------------------------------------------------------


def paper_factors(n: int, m: int) -> tuple[int, ...]:
    """lora-over.txt Tables 5 and 7: n = a * b with a <= b and b - a smallest; core 1 gets a, core m gets b and
    the m - 2 middle cores get 1 (e.g. 11008 -> (86, 1, ..., 1, 128))."""
    pairs = [(a, n // a) for a in range(1, n + 1) if n % a == 0 and a <= n // a]
    a, b = min(pairs, key=lambda p: p[1] - p[0])
    return (a, *([1] * (m - 2)), b)


def paper_bonds(i_f: tuple[int, ...], j_f: tuple[int, ...]) -> list[int]:
    """Eq. 4: d_k = min(prod_{p=1..k} i_p j_p, prod_{p=k+1..m} i_p j_p), k = 0..m (so d_0 = d_m = 1)."""
    size = [i * j for i, j in zip(i_f, j_f, strict=True)]
    return [min(math.prod(size[:k]), math.prod(size[k:])) for k in range(len(size) + 1)]


def paper_n_add(i_f: tuple[int, ...], j_f: tuple[int, ...]) -> int:
    """Eq. 6: N_add = sum_k i_k j_k d_{k-1} d_k - prod_k i_k j_k."""
    d = paper_bonds(i_f, j_f)
    cores = sum(i * j * d[k] * d[k + 1] for k, (i, j) in enumerate(zip(i_f, j_f, strict=True)))
    return cores - math.prod(i * j for i, j in zip(i_f, j_f, strict=True))


def paper_contract(cores: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 3 as one einsum, in float64: W[(i_1..i_m), (j_1..j_m)] = sum over bonds of prod_k T(k)[d_{k-1}, i_k, j_k, d_k].

    Row index (i_1, ..., i_m) and column index (j_1, ..., j_m) are read row-major (i_1 slowest), the reshape of an
    (I, J) matrix into (i_1, ..., i_m, j_1, ..., j_m).
    """
    m = len(cores)
    letters = iter(string.ascii_letters)
    d = [next(letters) for _ in range(m + 1)]
    i = [next(letters) for _ in range(m)]
    j = [next(letters) for _ in range(m)]
    spec = ",".join(f"{d[k]}{i[k]}{j[k]}{d[k + 1]}" for k in range(m))
    spec += f"->{d[0]}{''.join(i)}{''.join(j)}{d[m]}"
    out = torch.einsum(spec, *[c.detach().double() for c in cores])
    rows = math.prod(c.shape[1] for c in cores)
    return out.reshape(rows, -1)


def paper_op_mlp(gen: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """op-lora.txt Eq. 4 for layer `index` of a generator, in float64, from its own parameters:
    [vec(A); vec(B)] = W2 ReLU(W1 z + c1) + c2 (vec row-major, A first), and OP-DoRA's m = W2m h + c2m."""
    p = {n: t.detach().double()[index] for n, t in gen.named_parameters()}
    h = torch.clamp(p["w1"] @ p["z"] + p["c1"], min=0.0)  # (width,)
    out = p["w2"] @ h + p["c2"]  # (r*d_in + d_out*r,)
    r, d_in, d_out = gen.rank, gen.d_in, gen.d_out
    result = {"A": out[: r * d_in].reshape(r, d_in), "B": out[r * d_in :].reshape(d_out, r)}
    if "w2_m" in p:
        result["m"] = p["w2_m"] @ h + p["c2_m"]
    return result


def kaiming_uniform_bound(fan_in: int, a: float = math.sqrt(5)) -> float:
    """He et al. 2015 uniform bound sqrt(3) * gain / sqrt(fan_in), gain = sqrt(2 / (1 + a^2)); a = sqrt(5) is
    nn.Linear's and PEFT's lora_A init, giving 1 / sqrt(fan_in)."""
    return math.sqrt(3.0) * math.sqrt(2.0 / (1.0 + a * a)) / math.sqrt(fan_in)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class Shapes(nn.Module):
    """One Linear per target name; with rank r, `to_q` (d -> 16) has A (r, d) and `to_k` (16 -> d) has B (d, r)."""

    def __init__(self, d_a: int, d_b: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(d_a, 16)
        self.to_k = nn.Linear(16, d_b)


def op_model(method: str, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return opdiff.inject(TinyNet(), opdiff.AdapterConfig(method=method, rank=4, alpha=8.0))


def op_layers(model: nn.Module) -> list[tuple[opdiff.inject.AdaptedLayer, nn.Module, int]]:
    """(layer, its generator, its index there): the layers of one (r, d_in, d_out) share a stacked generator, in
    module order."""
    gens = [g for g in model.opdiff.values() if hasattr(g, "w2")]
    out, seen = [], {}
    for a in opdiff.adapted_layers(model):
        r, d_in = a.lora_A.weight.shape
        d_out = a.lora_B.weight.shape[0]
        gen = next(g for g in gens if (g.rank, g.d_in, g.d_out) == (r, d_in, d_out))
        seen[id(gen)] = seen.get(id(gen), -1) + 1
        out.append((a, gen, seen[id(gen)]))
    assert {id(g) for g in gens} == set(seen), "a generator serves no layer"
    return out


def mpo_matrices(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(f"{a.name}.{ab}", lin) for a in opdiff.adapted_layers(model)
            for ab, lin in (("A", a.lora_A), ("B", a.lora_B))]


def cores_of(linear: nn.Linear) -> list[torch.Tensor]:
    return list(linear.parametrizations.weight[0].cores)


def train_steps(model: nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on a fixed regression target, so that every trained tensor leaves its init."""
    opt = torch.optim.AdamW(opdiff.param_groups(model, lr=lr))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, ctx, y = torch.randn(3, 5, 12, generator=g), torch.randn(3, 7, 10, generator=g), torch.randn(3, 5, 20, generator=g)
        with opdiff.materialize(model):
            nn.functional.mse_loss(model(x, ctx), y).backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------------------------------------------------
# OP-LoRA / OP-DoRA: op-lora.txt Eq. 4 and Appendix C.1
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", OP_METHODS)
def test_op_a_b_m_are_the_eq4_mlp_of_the_generators_own_parameters(method):
    model = op_model(method)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # move every parameter off its init: biases, the B head and the m head included
        for gen in model.opdiff.values():
            for p in gen.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    checked = 0
    for a, gen, index in op_layers(model):
        pre = gen.w1.detach()[index] @ gen.z.detach()[index] + gen.c1.detach()[index]
        assert (pre < 0).any() and (pre > 0).any(), "the ReLU must matter for this test to test it"
        want = paper_op_mlp(gen, index)
        torch.testing.assert_close(a.lora_A.weight.double(), want["A"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.lora_B.weight.double(), want["B"], rtol=1e-5, atol=1e-5)
        if method == "op-dora":
            torch.testing.assert_close(a.magnitude.weight.double(), want["m"], rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == 12


@pytest.mark.parametrize("method", OP_METHODS)
def test_op_init_is_appendix_c1(method):
    """W1, W2 Kaiming uniform; the W2 rows that produce B zero; all biases zero; hence B = 0 at step 0."""
    model = op_model(method)
    for a, gen, index in op_layers(model):
        n_a = gen.rank * gen.d_in
        w1, w2 = gen.w1.detach()[index], gen.w2.detach()[index]  # (h, e), (r*d_in + d_out*r, h)
        assert torch.count_nonzero(gen.c1.detach()[index]) == 0
        assert torch.count_nonzero(gen.c2.detach()[index]) == 0
        assert torch.count_nonzero(w2[n_a:]) == 0
        assert torch.count_nonzero(a.lora_B.weight) == 0
        for w, fan_in in ((w1, w1.shape[1]), (w2[:n_a], w2.shape[1])):
            bound = kaiming_uniform_bound(fan_in)
            assert w.abs().max() <= bound * (1 + 1e-6)
            assert w.abs().max() >= 0.97 * bound  # >= 1536 uniform draws: the largest is within 3% of the bound
            assert float(w.std()) == pytest.approx(bound / math.sqrt(3.0), rel=0.1)  # uniform, not normal


@pytest.mark.parametrize("z_std", [None, 0.1])
def test_op_initial_a_scale_follows_from_appendix_c1(z_std):
    """With W1, W2 kaiming uniform (bound 1/sqrt(fan_in): variance 1/(3 fan_in)) and zero biases, W1 z has variance
    z_std^2 / 3, the ReLU keeps half of its second moment and W2 divides by 3: std(A) = z_std / sqrt(18)."""
    from opdiff.methods.op import OPGenerator

    torch.manual_seed(0)
    if z_std is None:  # the default: z ~ N(0, 1)
        gen, z_std = OPGenerator(64, 4, 256, 32, width=32, embed_dim=128), 1.0
    else:
        gen = OPGenerator(64, 4, 256, 32, width=32, embed_dim=128, z_std=z_std)
    with torch.no_grad():
        a = gen.compute()["A"]  # (64, 4, 256)
    assert float(a.std()) == pytest.approx(z_std / math.sqrt(18.0), rel=0.05)
    assert float(gen.z.detach().std()) == pytest.approx(z_std, rel=0.05)


def test_op_dora_magnitude_starts_at_peft_dora_magnitude():
    """OP-DoRA's m head starts where DoRA starts: m = ||W0 + s B A||_row = ||W0||_row (B = 0), per output."""
    model = op_model("op-dora")
    torch.manual_seed(0)
    dora = opdiff.inject(TinyNet(), opdiff.AdapterConfig(method="dora", rank=4, alpha=8.0))
    for (a, _, _), d in zip(op_layers(model), opdiff.adapted_layers(dora), strict=True):
        w0 = a.layer.get_base_layer().weight.detach().double()  # (d_out, d_in)
        want = torch.linalg.vector_norm(w0, dim=1)
        torch.testing.assert_close(a.magnitude.weight.detach().double(), want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(d.magnitude.weight.detach().double(), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# LoRA-Over: lora-over.txt Eq. 3, 4, 6, Tables 5 and 7
# ---------------------------------------------------------------------------------------------------------------

# (matrix rows, cols, m, first core (i, j), last core (i, j)) as printed in the tables; rank r = 8.
TABLE_ROWS = [
    # Table 5 (T5-Base): SVD and 16-core MPO
    (768, 8, 2, (24, 2), (32, 4)),
    (8, 768, 2, (2, 24), (4, 32)),
    (3072, 8, 2, (48, 2), (64, 4)),
    (8, 3072, 2, (2, 48), (4, 64)),
    (768, 8, 16, (24, 2), (32, 4)),
    (8, 3072, 16, (2, 48), (4, 64)),
    # Table 7 (Llama 2-7B): SVD and 9-core MPO; Llama 3.1-8B: 10 cores
    (4096, 8, 2, (64, 2), (64, 4)),
    (11008, 8, 2, (86, 2), (128, 4)),
    (8, 11008, 2, (2, 86), (4, 128)),
    (4096, 8, 9, (64, 2), (64, 4)),
    (8, 4096, 9, (2, 64), (4, 64)),
    (11008, 8, 9, (86, 2), (128, 4)),
    (4096, 8, 10, (64, 2), (64, 4)),
]


def _inject_for(rows: int, cols: int, method: str, m: int) -> tuple[nn.Module, nn.Linear]:
    """A model whose adapter has the (rows, cols) matrix at rank 8; returns it and that matrix's Linear."""
    torch.manual_seed(0)
    if rows == 8:  # A (8, d_in): the to_q layer, d_in = cols
        model, pick = Shapes(cols, 16), ("to_q", "A")
    else:  # B (d_out, 8): the to_k layer, d_out = rows
        model, pick = Shapes(16, rows), ("to_k", "B")
    opdiff.inject(model, opdiff.AdapterConfig(method=method, rank=8, mpo_cores=m, target_modules=("to_q", "to_k")))
    layer = next(a for a in opdiff.adapted_layers(model) if a.name == pick[0])
    return model, layer.lora_A if pick[1] == "A" else layer.lora_B


@pytest.mark.parametrize(("rows", "cols", "m", "first", "last"), TABLE_ROWS,
                         ids=[f"{r}x{c}-m{m}" for r, c, m, _, _ in TABLE_ROWS])
def test_cores_have_the_layout_of_tables_5_and_7_and_the_bonds_of_eq4(rows, cols, m, first, last):
    i_f, j_f = paper_factors(rows, m), paper_factors(cols, m)
    assert (i_f[0], j_f[0]) == first and (i_f[-1], j_f[-1]) == last, "the oracle must read the tables as printed"
    method = "lora-over-svd" if m == 2 else "lora-over-mpo"
    _, linear = _inject_for(rows, cols, method, m)
    d = paper_bonds(i_f, j_f)
    want = [(d[k], i_f[k], j_f[k], d[k + 1]) for k in range(m)]
    assert [tuple(c.shape) for c in cores_of(linear)] == want
    assert mpo.factorize(rows, m) == i_f and mpo.factorize(cols, m) == j_f
    assert mpo.bond_dims(i_f, j_f) == d


@pytest.mark.parametrize(
    ("i_f", "j_f", "n_add"),
    [
        # Table 7 SVD (4096, 8): cores (1, 64, 2, 128) + (128, 64, 4, 1) = 16384 + 32768; minus 4096 * 8
        ((64, 64), (2, 4), 16384),
        # Table 7 MPO (4096, 8), 9 cores, every bond 128: 128*128 + 7 * 128*128 + 256*128 - 32768
        ((64, *[1] * 7, 64), (2, *[1] * 7, 4), 131072),
        # sizes 8, 8, 16 -> bonds 1, 8, 16, 1: 8*8 + 8*8*16 + 16*16 - 1024 (d_1 != d_2: an off-by-one shows)
        ((4, 2, 4), (2, 4, 4), 320),
        # sizes 6, 10, 3 -> bonds 1, 6, 3, 1: 6*6 + 10*6*3 + 3*3 - 180
        ((2, 5, 3), (3, 2, 1), 45),
    ],
)
def test_n_add_is_eq6(i_f, j_f, n_add):
    assert paper_n_add(i_f, j_f) == n_add
    assert mpo.n_add(i_f, j_f) == n_add


@pytest.mark.parametrize(("rows", "cols", "m"), [(768, 8, 16), (8, 3072, 16), (11008, 8, 9), (8, 640, 5), (320, 8, 3)])
def test_added_parameters_of_an_injected_matrix_are_eq6(rows, cols, m):
    _, linear = _inject_for(rows, cols, "lora-over-mpo", m)
    added = sum(c.numel() for c in cores_of(linear)) - rows * cols
    assert added == paper_n_add(paper_factors(rows, m), paper_factors(cols, m))


@pytest.mark.parametrize(("method", "m"), [("lora-over-mpo", 5), ("lora-over-svd", 2), ("lora-over-mpor", 3)])
def test_the_run_report_adds_eq6_over_every_matrix_with_cores(method, m):
    """The N_add a run logs (config.json `method_report`) is Eq. 6 summed over the matrices that have cores: all of
    them for MPO/SVD; none before a selection, the chosen ones after it."""
    model, _ = _inject_for(8, 640, method, m)
    expected = sum(paper_n_add(paper_factors(r, m), paper_factors(c, m))
                   for layer in opdiff.adapted_layers(model)
                   for r, c in (tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape)))
    method_ = opdiff.method_of(model)
    if method == "lora-over-mpor":
        assert method_.report(model) == {"n_add": 0}
        method_.at_largest(model)  # 0.75 of each one-layer group: both layers
    assert method_.report(model) == {"n_add": expected} and expected > 0


def test_lora_over_svd_is_the_two_core_case_whatever_mpo_cores_says():
    """lora-over.txt Sec. 5 / Tables 5, 7: LoRA-Over-SVD = 2 cores for every matrix; the same cores as a 2-core MPO."""
    torch.manual_seed(0)
    svd = opdiff.inject(TinyNet(), opdiff.AdapterConfig(method="lora-over-svd", rank=4, mpo_cores=5))
    torch.manual_seed(0)
    two = opdiff.inject(TinyNet(), opdiff.AdapterConfig(method="lora-over-mpo", rank=4, mpo_cores=2))
    for (name, a), (_, b) in zip(mpo_matrices(svd), mpo_matrices(two), strict=True):
        rows, cols = a.weight.shape
        i_f, j_f = paper_factors(rows, 2), paper_factors(cols, 2)
        d = paper_bonds(i_f, j_f)
        assert [tuple(c.shape) for c in cores_of(a)] == [(1, i_f[0], j_f[0], d[1]), (d[1], i_f[1], j_f[1], 1)], name
        for x, y in zip(cores_of(a), cores_of(b), strict=True):
            assert torch.equal(x, y), name


@pytest.mark.parametrize(("method", "m"), [("lora-over-svd", 2), ("lora-over-mpo", 3), ("lora-over-mpo", 5)])
def test_cores_contract_by_eq3_to_peft_init(method, m):
    """At inject: the Eq. 3 contraction of A's cores is PEFT's kaiming A exactly, of B's cores exactly zero."""
    torch.manual_seed(0)
    model = opdiff.inject(TinyNet(), opdiff.AdapterConfig(method=method, rank=4, mpo_cores=m))
    for name, linear in mpo_matrices(model):
        assert len(cores_of(linear)) == m
        got = paper_contract(cores_of(linear))
        original = linear.parametrizations.weight.original.double()  # PEFT's init, kept frozen beside the cores
        if name.endswith(".A"):
            assert torch.count_nonzero(original) > 0
            torch.testing.assert_close(got, original, rtol=1e-5, atol=1e-6)
        else:
            assert torch.count_nonzero(got) == 0
        torch.testing.assert_close(linear.weight.detach().double(), got, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Collapse: the method's function evaluated once, shipped as the plain LoRA of Eq. 2
# ---------------------------------------------------------------------------------------------------------------


def _expected_tensors(model: nn.Module, method: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: A, B (and m) computed here from the method's own trainable parameters."""
    if method in OP_METHODS:
        return {a.name: paper_op_mlp(gen, i) for a, gen, i in op_layers(model)}
    return {a.name: {"A": paper_contract(cores_of(a.lora_A)), "B": paper_contract(cores_of(a.lora_B))}
            for a in opdiff.adapted_layers(model)}


@pytest.mark.parametrize("method", OP_METHODS + MPO_METHODS)
def test_collapse_is_the_methods_function_and_a_plain_lora_of_eq2(method):
    alpha, rank = 8.0, 4
    torch.manual_seed(0)
    model = opdiff.inject(TinyNet(), opdiff.AdapterConfig(method=method, rank=rank, alpha=alpha, mpo_cores=5))
    train_steps(model)
    want = _expected_tensors(model, method)
    assert all(torch.count_nonzero(t["B"]) > 0 for t in want.values()), "training must have moved B"
    opdiff.collapse(model)
    g = torch.Generator().manual_seed(3)
    for a in opdiff.adapted_layers(model):
        w = want[a.name]
        torch.testing.assert_close(a.lora_A.weight.detach().double(), w["A"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.lora_B.weight.detach().double(), w["B"], rtol=1e-5, atol=1e-6)
        base = a.layer.get_base_layer()
        w0 = base.weight.detach().double()  # (d_out, d_in)
        bias = base.bias.detach().double() if base.bias is not None else 0.0
        x = torch.randn(6, w0.shape[1], generator=g, dtype=torch.float64)  # (batch, d_in)
        delta = (alpha / rank) * w["B"] @ w["A"]  # Eq. 2: W = W0 + (alpha / r) B A
        if "m" in w:  # DoRA: W = m * (W0 + s B A) / ||W0 + s B A||_row
            adapted = w0 + delta
            y_want = (x @ adapted.T) * (w["m"] / torch.linalg.vector_norm(adapted, dim=1)) + bias
            torch.testing.assert_close(a.magnitude.weight.detach().double(), w["m"], rtol=1e-5, atol=1e-6)
        else:
            y_want = x @ (w0 + delta).T + bias
        with torch.no_grad():
            y = a.layer(x.float()).double()
        torch.testing.assert_close(y, y_want, rtol=1e-4, atol=1e-5)


def test_core_lr_power_zero_is_the_papers_main_lr_and_power_divides_by_m():
    """lora-over.txt Tables 4 and 6 train the cores at (about) the main LR: power 0, no limit. Else lr / m^power."""
    from opdiff.methods.lora_over import core_lr

    assert core_lr(1e-3, 5, power=0.0, cap=0.0) == 1e-3
    assert core_lr(1e-3, 2, power=0.0, cap=0.0) == 1e-3
    assert core_lr(1e-2, 4, power=1.5, cap=0.0) == pytest.approx(1e-2 / 8)
    assert core_lr(1e-2, 5, power=1.0, cap=0.0) == pytest.approx(2e-3)
    assert core_lr(1e-2, 3, power=2.0, cap=0.0) == pytest.approx(1e-2 / 9)
    with pytest.raises(ValueError, match="n_cores=1"):
        core_lr(1e-3, 1)
    with pytest.raises(ValueError, match="power=-1"):
        core_lr(1e-3, 3, power=-1.0)
    with pytest.raises(ValueError, match="cap=-1"):
        core_lr(1e-3, 3, cap=-1.0)


@pytest.mark.parametrize(("lr", "m", "expected"), [
    # below the limit 1e-2 / m^2 the cores train at the main lr, as the paper does ...
    (1e-5, 8, 1e-5), (1e-4, 5, 1e-4), (1e-3, 3, 1e-3), (1e-3, 2, 1e-3),
    # ... above it at the limit: 1e-2 / 4, 1e-2 / 9, 1e-2 / 25, 1e-2 / 64
    (1e-2, 2, 0.0025), (1e-2, 3, 0.0011111111111111111), (1e-3, 5, 0.0004), (3e-2, 5, 0.0004), (1e-3, 8, 0.00015625),
])
def test_default_core_lr_is_the_main_lr_up_to_a_limit_of_1e_2_over_m_squared(lr, m, expected):
    """The default (no mpo_lr, mpo_lr_power 0, mpo_lr_cap 1e-2): min(lr, 1e-2 / m^2), values written out."""
    from opdiff.methods.lora_over import MPO_LR_CAP, MPO_LR_POWER, core_lr

    assert (MPO_LR_POWER.default, MPO_LR_CAP.default) == (0.0, 1e-2)
    assert core_lr(lr, m, MPO_LR_POWER.default, MPO_LR_CAP.default) == pytest.approx(expected, rel=1e-12)
    assert core_lr(lr, m) == pytest.approx(expected, rel=1e-12)


def test_runs_saved_before_the_core_lr_limit_and_the_gauge_keep_their_behaviour():
    """A saved config without these settings meant: cores at the main lr, no limit, the symmetric gauge."""
    from opdiff.methods.lora_over import MPO_GAUGE, MPO_LR_CAP, MPO_LR_POWER
    from pipelines.config import saved_settings

    assert (MPO_LR_POWER.absent, MPO_LR_CAP.absent, MPO_GAUGE.absent) == (0.0, 0.0, "symmetric")
    old = saved_settings({"method": "lora-over-mpo", "mpo_cores": 5})  # a config saved before all three
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    opdiff.inject(model, opdiff.AdapterConfig(method="lora-over-mpo", target_modules=("0",), mpo_cores=5,
                                              **{k: old[k] for k in ("mpo_lr_power", "mpo_lr_cap", "mpo_gauge")}))
    (group,) = opdiff.param_groups(model, lr=3e-2)
    assert group["lr"] == 3e-2  # the paper's rate, unlimited
