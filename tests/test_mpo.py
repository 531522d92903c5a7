"""MPO decomposition (opdiff/mpo.py) against lora-over.txt Eq. 3-6, Alg. 1, Eq. 11 and Tables 5 and 7."""

from __future__ import annotations

import math

import pytest
import torch

from opdiff import mpo

ONES_14 = (1,) * 14
ONES_7 = (1,) * 7


def _rand(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=dtype)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _unfolding(w: torch.Tensor, i_f, j_f, k: int) -> torch.Tensor:
    """W's k-th unfolding (prod_{p<=k} i_p j_p, prod_{p>k} i_p j_p), built independently of opdiff.mpo."""
    m = len(i_f)
    t = w.double().reshape(*i_f, *j_f).permute([a for p in range(m) for a in (p, m + p)])
    return t.reshape(math.prod(i_f[:k]) * math.prod(j_f[:k]), -1)


# (rows, cols, i_factors, j_factors): SDXL r=4 LoRA matrices, A (4, d_in) and B (d_out, 4), factored evenly.
SDXL_CASES = [
    (rows, cols, mpo.factorize(rows, m), mpo.factorize(cols, m))
    for d in (320, 640, 1280, 2048)
    for rows, cols in ((4, d), (d, 4))
    for m in (2, 3, 5)
]
# lora-over.txt Table 7 (Llama 2-7B, r = 8): SVD = 2 cores, MPO = 9 cores, with the paper's factors.
LLAMA_CASES = [
    (4096, 8, (64, 64), (2, 4)),
    (8, 4096, (2, 4), (64, 64)),
    (11008, 8, (86, 128), (2, 4)),
    (4096, 8, (64, *ONES_7, 64), (2, *ONES_7, 4)),
    (8, 4096, (2, *ONES_7, 4), (64, *ONES_7, 64)),
    (11008, 8, (86, *ONES_7, 128), (2, *ONES_7, 4)),
]
# Odd sizes: no step of the decomposition may assume an even element count.
ODD_CASES = [(9, 15, (3, 1, 3), (3, 1, 5)), (15, 7, (3, 5), (7, 1))]
CASES = SDXL_CASES + LLAMA_CASES + ODD_CASES
CASE_IDS = [f"{r}x{c}-m{len(i)}" for r, c, i, _ in CASES]
# A chain whose middle core has real physical dimensions: sizes i_k j_k = 8, 8, 16, bonds [1, 8, 16, 1].
I3, J3 = (4, 2, 4), (2, 4, 4)


@pytest.mark.parametrize(
    ("n", "m", "expected"),
    [
        # Table 5 (T5-Base, 16 cores)
        (768, 16, (24, *ONES_14, 32)),
        (3072, 16, (48, *ONES_14, 64)),
        (8, 16, (2, *ONES_14, 4)),
        # Table 7 (Llama 2-7B: 2 and 9 cores; Llama 3.1-8B: 2, 8 and 10 cores)
        (4096, 2, (64, 64)),
        (8, 2, (2, 4)),
        (11008, 2, (86, 128)),
        (1024, 2, (32, 32)),
        (14336, 2, (112, 128)),
        (4096, 9, (64, *ONES_7, 64)),
        (11008, 9, (86, *ONES_7, 128)),
        (8, 9, (2, *ONES_7, 4)),
        (4096, 10, (64, *(1,) * 8, 64)),
        (4096, 8, (64, *(1,) * 6, 64)),
        # SDXL dimensions, a prime, and 1
        (320, 5, (16, 1, 1, 1, 20)),
        (640, 3, (20, 1, 32)),
        (1280, 2, (32, 40)),
        (2048, 2, (32, 64)),
        (4, 3, (2, 1, 2)),
        (13, 3, (1, 1, 13)),
        (1, 2, (1, 1)),
    ],
)
def test_factorize_reproduces_paper_tables(n, m, expected):
    assert mpo.factorize(n, m) == expected


@pytest.mark.parametrize(
    ("n", "m", "match"), [(8, 1, "m >= 2"), (0, 2, "positive integer"), (8.0, 2, "n=8.0")]
)
def test_factorize_rejects_bad_arguments(n, m, match):
    with pytest.raises(ValueError, match=match):
        mpo.factorize(n, m)


def test_bond_dims_match_eq4_by_hand():
    # prod_{p<=k} i_p j_p = 8, 64; prod_{p>k} = 128, 16  ->  d_1 = min(8, 128), d_2 = min(64, 16)
    assert mpo.bond_dims(I3, J3) == [1, 8, 16, 1]
    # Table 7 MPO of (4096, 8): 64 * 2 on the left, 64 * 4 on the right, every middle bond is 128.
    assert mpo.bond_dims((64, *ONES_7, 64), (2, *ONES_7, 4)) == [1] + [128] * 8 + [1]


@pytest.mark.parametrize(("rows", "cols", "i_f", "j_f"), CASES, ids=CASE_IDS)
def test_bond_dims_are_the_ranks_of_a_generic_matrix_unfoldings(rows, cols, i_f, j_f):
    """Eq. 4's d_k is the largest rank W's k-th unfolding can have, so a random W's unfoldings reach it exactly."""
    w = _rand(rows, cols, seed=rows * cols, dtype=torch.float64)
    ranks = [int(torch.linalg.matrix_rank(_unfolding(w, i_f, j_f, k))) for k in range(len(i_f) + 1)]
    assert mpo.bond_dims(i_f, j_f) == ranks


def test_n_add_matches_eq6_by_hand():
    # sum_k i_k j_k d_{k-1} d_k = 8*1*8 + 8*8*16 + 16*16*1 = 1344;  prod_k i_k j_k = 1024
    assert mpo.n_add(I3, J3) == 320
    # Table 7 SVD of (4096, 8): 128*128 + 256*128 - 4096*8
    assert mpo.n_add((64, 64), (2, 4)) == 16384


@pytest.mark.parametrize(("rows", "cols", "i_f", "j_f"), CASES, ids=CASE_IDS)
def test_decompose_contract_roundtrip(rows, cols, i_f, j_f):
    w = _rand(rows, cols, seed=rows + cols)
    cores = mpo.decompose(w, i_f, j_f)
    dims = mpo.bond_dims(i_f, j_f)
    assert [tuple(c.shape) for c in cores] == [
        (dims[k], i_f[k], j_f[k], dims[k + 1]) for k in range(len(i_f))
    ]
    assert all(c.dtype == torch.float32 for c in cores)
    out = mpo.contract(cores)
    assert out.shape == (rows, cols) and out.dtype == torch.float32
    assert _rel_err(out, w) < 1e-5


@pytest.mark.parametrize("gauge", mpo.GAUGES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_decompose_keeps_dtype(dtype, gauge):
    w = _rand(32, 32, seed=1, dtype=dtype)
    cores = mpo.decompose(w, I3, J3, gauge=gauge)
    assert all(c.dtype == dtype for c in cores)
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert _rel_err(mpo.contract(cores), w) < tol


@pytest.mark.parametrize(("i_f", "j_f"), [(I3, J3), ((4, 2), (2, 16)), ((2, 1, 1, 16), (16, 1, 1, 2))])
def test_cores_are_in_the_symmetric_gauge(i_f, j_f):
    """At every bond k: left product X_k and right product Y_k have X^T X = Y Y^T = diag(singular values)."""
    w = _rand(math.prod(i_f), math.prod(j_f), seed=2, dtype=torch.float64)
    cores = mpo.decompose(w, i_f, j_f)
    for k in range(1, len(cores)):
        x = cores[0].reshape(-1, cores[0].shape[-1])
        for c in cores[1:k]:
            x = (x @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])  # (prod_{p<=k} i_p j_p, d_k)
        y = cores[-1].reshape(cores[-1].shape[0], -1)
        for c in reversed(cores[k:-1]):
            y = (c.reshape(-1, c.shape[-1]) @ y).reshape(c.shape[0], -1)  # (d_k, prod_{p>k} i_p j_p)
        sv = torch.linalg.svdvals(_unfolding(w, i_f, j_f, k))[: x.shape[1]]
        torch.testing.assert_close(x.T @ x, torch.diag(sv), atol=1e-10, rtol=0)
        torch.testing.assert_close(y @ y.T, torch.diag(sv), atol=1e-10, rtol=0)


def _rank_two(g: torch.Generator) -> torch.Tensor:
    return torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g)  # rank 2, bonds of 16


def _one_block(g: torch.Generator) -> torch.Tensor:
    w = torch.zeros(64, 64)
    w[:8, :8] = torch.randn(8, 8, generator=g)  # exactly zero singular values on every bond
    return w


@pytest.mark.parametrize("make", [_rank_two, _one_block])
def test_rank_deficient_matrix_reconstructs(make):
    """Bond channels with zero singular values must not blow up (no division by a zero singular value)."""
    w = make(torch.Generator().manual_seed(3))
    cores = mpo.decompose(w, (4, 4, 4), (4, 4, 4))
    assert all(torch.isfinite(c).all() for c in cores)
    assert _rel_err(mpo.contract(cores), w) < 1e-5


@pytest.mark.parametrize(("rows", "cols", "i_f", "j_f"), [CASES[0], CASES[2], CASES[5], LLAMA_CASES[3]])
def test_gradients_reach_every_core(rows, cols, i_f, j_f):
    cores = [c.requires_grad_() for c in mpo.decompose(_rand(rows, cols, seed=6), i_f, j_f)]
    upstream = _rand(rows, cols, seed=7)
    (mpo.contract(cores) * upstream).sum().backward()
    for c in cores:
        assert c.grad is not None and torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0


def test_contract_gradient_is_correct():
    # sizes i_k j_k = 2, 4, 4 with bonds [1, 2, 4, 1]: 52 core entries keep the finite differences cheap.
    i_f, j_f = (2, 2, 2), (1, 2, 2)
    cores = [c.requires_grad_() for c in mpo.decompose(_rand(8, 4, seed=8, dtype=torch.float64), i_f, j_f)]
    assert torch.autograd.gradcheck(lambda *cs: mpo.contract(list(cs)), cores)


@pytest.mark.parametrize(("i_f", "j_f"), [((2, 2), (16, 20)), (I3, J3)])
def test_zero_matrix_decomposes_to_isometry_then_zeros(i_f, j_f):
    w = torch.zeros(math.prod(i_f), math.prod(j_f))
    cores = [c.requires_grad_() for c in mpo.decompose(w, i_f, j_f)]
    first = cores[0].detach().reshape(-1, cores[0].shape[-1])
    torch.testing.assert_close(first.T @ first, torch.eye(first.shape[1]))
    assert all(torch.count_nonzero(c) == 0 for c in cores[1:])
    out = mpo.contract(cores)
    assert torch.count_nonzero(out) == 0
    (out * _rand(*w.shape, seed=9)).sum().backward()
    live = [bool(c.grad.abs().sum() > 0) for c in cores]
    # Two cores: the zero core still learns. Three or more: every gradient has a zero core in it.
    assert live == ([False, True] if len(cores) == 2 else [False] * len(cores))


@pytest.mark.parametrize(
    ("i_f", "j_f"), [((64, 64), (2, 4)), (mpo.factorize(640, 5), mpo.factorize(4, 5)), (I3, J3)]
)
def test_zero_product_cores(i_f, j_f):
    cores = [c.requires_grad_() for c in mpo.zero_product_cores(i_f, j_f, torch.Generator().manual_seed(10))]
    dims = mpo.bond_dims(i_f, j_f)
    assert [tuple(c.shape) for c in cores] == [
        (dims[k], i_f[k], j_f[k], dims[k + 1]) for k in range(len(i_f))
    ]
    assert all(c.dtype == torch.float32 for c in cores)
    assert torch.count_nonzero(cores[-1]) == 0 and all(torch.count_nonzero(c) > 0 for c in cores[:-1])
    out = mpo.contract(cores)
    assert torch.equal(out, torch.zeros(math.prod(i_f), math.prod(j_f)))
    (out * _rand(*out.shape, seed=11)).sum().backward()
    assert cores[-1].grad.abs().sum() > 0
    # As documented: the decomposition of a float64 N(0, 1/J) matrix drawn from the generator, last core zeroed.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64) / math.sqrt(out.shape[1])
    for a, b in zip(cores[:-1], mpo.decompose(w, i_f, j_f)[:-1], strict=True):
        torch.testing.assert_close(a.detach(), b.float())
    # Seeded: the same generator seed gives the same cores.
    again = mpo.zero_product_cores(i_f, j_f, torch.Generator().manual_seed(10))
    assert all(torch.equal(a.detach(), b) for a, b in zip(cores, again, strict=True))


@pytest.mark.parametrize(
    ("shape", "i_f", "j_f", "match"),
    [
        ((4, 320), (2, 4), (16, 20), r"prod\(i_factors\)=8 != rows=4 .*i_factors=\(2, 4\)"),
        ((4, 320), (2, 2), (16, 21), r"prod\(j_factors\)=336 != cols=320 .*j_factors=\(16, 21\)"),
        (
            (4, 320),
            (2, 2),
            (16, 4, 5),
            r"i_factors=\(2, 2\) and j_factors=\(16, 4, 5\) must have the same",
        ),
        ((4, 320), (4,), (320,), r"at least 2 cores, got i_factors=\(4,\)"),
        (
            (4, 320),
            (4, 1),
            (0, 320),
            r"positive integers, got i_factors=\(4, 1\), j_factors=\(0, 320\)",
        ),
        ((1280,), (2, 2), (16, 20), r"2-D matrix, got \(1280,\)"),
        ((4, 320), (2.0, 2), (16, 20), r"positive integers, got i_factors=\(2.0, 2\)"),
        ((4, 320), (True, 4), (16, 20), r"positive integers, got i_factors=\(True, 4\)"),
    ],
)
def test_decompose_rejects_bad_factors(shape, i_f, j_f, match):
    with pytest.raises(ValueError, match=match):
        mpo.decompose(torch.zeros(shape), i_f, j_f)


def test_decompose_rejects_a_non_tensor_by_its_type():
    with pytest.raises(ValueError, match="2-D matrix, got list"):
        mpo.decompose([[1.0, 2.0], [3.0, 4.0]], (1, 2), (2, 1))


def test_decompose_rejects_integer_matrix():
    with pytest.raises(ValueError, match="floating-point"):
        mpo.decompose(torch.zeros(4, 4, dtype=torch.int64), (2, 2), (2, 2))


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ([], "^contract needs at least one MPO core, got none$"),
        ([(1, 2, 2, 4), (3, 2, 2, 1)], "bond 1 does not match: core 0 ends with 4, core 1 starts with 3"),
        ([(1, 2, 2, 4), (4, 2, 2, 5), (3, 2, 2, 1)], "bond 2 does not match: core 1 ends with 5, core 2 starts with 3"),
        ([(2, 2, 2, 4), (4, 2, 2, 1)], "outer bonds"),
        ([(1, 2, 4), (4, 2, 2, 1)], "4-D"),
    ],
)
def test_contract_rejects_bad_cores(shapes, match):
    with pytest.raises(ValueError, match=match):
        mpo.contract([torch.zeros(s) for s in shapes])


@pytest.mark.parametrize(("i_f", "j_f"), [(mpo.factorize(4, m), mpo.factorize(640, m)) for m in (2, 3, 5)] + [(I3, J3)])
def test_contract_batched_equals_contract_per_matrix(i_f, j_f):
    g = torch.Generator().manual_seed(3)
    m = len(i_f)
    chains = [mpo.decompose(torch.randn(math.prod(i_f), math.prod(j_f), generator=g), i_f, j_f) for _ in range(3)]
    stacked = [torch.stack([c[k] for c in chains]).requires_grad_() for k in range(m)]
    batched = mpo.contract_batched(stacked)  # (3, 4, 640)
    single = torch.stack([mpo.contract([s[n] for s in stacked]) for n in range(3)])
    assert torch.allclose(batched, single, atol=1e-6)
    upstream = torch.randn(batched.shape, generator=g)
    grads_b = torch.autograd.grad((batched * upstream).sum(), stacked)
    grads_s = torch.autograd.grad((single * upstream).sum(), stacked)
    for a, b in zip(grads_b, grads_s, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    msg = r"^contract_batched needs stacked cores shaped \(L, d_\{k-1\}, i_k, j_k, d_k\) with one L$"
    with pytest.raises(ValueError, match=msg):
        mpo.contract_batched([s[0] for s in stacked])
    with pytest.raises(ValueError, match=msg):  # 5-D, but two different L
        mpo.contract_batched([stacked[0], *[s[:2] for s in stacked[1:]]])
    # L = 1 is a batch too
    torch.testing.assert_close(mpo.contract_batched([s[:1] for s in stacked])[0], single[0])


def test_a_one_core_chain_is_its_matrix():
    core = torch.arange(6.0).reshape(1, 2, 3, 1)
    torch.testing.assert_close(mpo.contract([core]), core.reshape(2, 3))
    torch.testing.assert_close(mpo.contract_batched([core[None]])[0], core.reshape(2, 3))


@pytest.mark.parametrize("m", [2, 3, 5])
def test_nearby_matrices_get_nearby_cores(m):
    """The SVD's free choices (signs, the basis of zero-singular-value channels) are fixed, so a 1e-7 change
    of a rank-4 LoRA matrix moves its cores by about as much, not to another gauge."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 640, generator=g, dtype=torch.float64)
    i_f, j_f = mpo.factorize(4, m), mpo.factorize(640, m)
    a = mpo.decompose(w, i_f, j_f)
    b = mpo.decompose(w + 1e-7 * torch.randn(w.shape, generator=g, dtype=torch.float64), i_f, j_f)
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max() < 1e-4


# Bonds no larger than the generic rank of every unfolding: every channel is live, so Alg. 1's SVDs are unique
# up to signs.
LEFT_CASES = [(I3, J3), ((4, 2), (2, 16)), ((2, 1, 1, 16), (16, 1, 1, 2)), (mpo.factorize(4, 5), mpo.factorize(64, 5))]


@pytest.mark.parametrize(("i_f", "j_f"), LEFT_CASES)
def test_left_gauge_is_algorithm_1(i_f, j_f):
    """Alg. 1 as written: cores 1..m-1 are left isometries over their (d_{k-1} i_k j_k, d_k) reshape, the last
    core is lambda V^T of the SVD of W's (m-1)-th unfolding (each row sigma_i v_i up to its sign), and the chain
    contracts back to W."""
    w = _rand(math.prod(i_f), math.prod(j_f), seed=3, dtype=torch.float64)
    cores = mpo.decompose(w, i_f, j_f, gauge="left")
    m = len(cores)
    for core in cores[:-1]:
        u = core.reshape(-1, core.shape[-1])  # (d_{k-1} i_k j_k, d_k)
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-12, rtol=0)
    _, s, vh = torch.linalg.svd(_unfolding(w, i_f, j_f, m - 1), full_matrices=False)
    last = cores[-1].reshape(cores[-1].shape[0], -1)  # (d_{m-1}, i_m j_m)
    expected = s[: last.shape[0], None] * vh[: last.shape[0]]
    signs = torch.sign((last * expected).sum(dim=1, keepdim=True))
    torch.testing.assert_close(last, signs * expected, atol=1e-10, rtol=0)
    assert _rel_err(mpo.contract(cores), w) < 1e-12


@pytest.mark.parametrize(("i_f", "j_f"), LEFT_CASES[:3])
def test_the_two_gauges_differ_where_the_paper_says(i_f, j_f):
    """Swapping the gauges fails here: the left gauge's first core is an isometry and the symmetric one's is
    U sqrt(lambda) (X^T X = diag(lambda) at bond 1); both contract to W."""
    w = _rand(math.prod(i_f), math.prod(j_f), seed=4, dtype=torch.float64)
    sv = torch.linalg.svdvals(_unfolding(w, i_f, j_f, 1))
    for gauge, gram in (("left", torch.ones_like(sv)), ("symmetric", sv)):
        cores = mpo.decompose(w, i_f, j_f, gauge=gauge)
        x = cores[0].reshape(-1, cores[0].shape[-1])  # (i_1 j_1, d_1)
        torch.testing.assert_close(x.T @ x, torch.diag(gram[: x.shape[1]]), atol=1e-10, rtol=0)
        assert _rel_err(mpo.contract(cores), w) < 1e-12
    default, sym = mpo.decompose(w, i_f, j_f), mpo.decompose(w, i_f, j_f, gauge="symmetric")  # the default
    assert all(torch.equal(a, b) for a, b in zip(default, sym, strict=True))


@pytest.mark.parametrize(("i_f", "j_f"), [((2, 2), (16, 20)), (I3, J3), (mpo.factorize(4, 5), mpo.factorize(64, 5))])
def test_zero_matrix_in_the_left_gauge_is_isometries_then_a_trainable_zero(i_f, j_f):
    w = torch.zeros(math.prod(i_f), math.prod(j_f), dtype=torch.float64)
    cores = [c.requires_grad_() for c in mpo.decompose(w, i_f, j_f, gauge="left")]
    for core in cores[:-1]:
        u = core.detach().reshape(-1, core.shape[-1])
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype))
    assert torch.count_nonzero(cores[-1]) == 0
    out = mpo.contract(cores)
    assert torch.count_nonzero(out) == 0
    (out * _rand(*w.shape, seed=9, dtype=torch.float64)).sum().backward()
    assert cores[-1].grad.abs().sum() > 0  # the isometries in front of it pass the gradient on


@pytest.mark.parametrize(("i_f", "j_f"), [((64, 64), (2, 4)), (mpo.factorize(640, 5), mpo.factorize(4, 5))])
def test_zero_product_cores_in_the_left_gauge(i_f, j_f):
    """B at init in Alg. 1's gauge: a N(0, 1/J) matrix decomposed, its last core zeroed; the rest are isometries."""
    cores = [c.requires_grad_() for c in mpo.zero_product_cores(i_f, j_f, torch.Generator().manual_seed(10),
                                                                 gauge="left")]
    for core in cores[:-1]:
        u = core.detach().double().reshape(-1, core.shape[-1])
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-6, rtol=0)
    out = mpo.contract(cores)
    assert torch.equal(out, torch.zeros(math.prod(i_f), math.prod(j_f)))
    (out * _rand(*out.shape, seed=11)).sum().backward()
    assert cores[-1].grad.abs().sum() > 0
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64) / math.sqrt(out.shape[1])
    for a, b in zip(cores[:-1], mpo.decompose(w, i_f, j_f, gauge="left")[:-1], strict=True):
        torch.testing.assert_close(a.detach(), b.float())


def test_decompose_rejects_an_unknown_gauge():
    with pytest.raises(ValueError, match="unknown MPO gauge 'right'; choose one of: symmetric, left"):
        mpo.decompose(_rand(8, 32), I3, J3, gauge="right")
