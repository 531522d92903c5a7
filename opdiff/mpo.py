"""Matrix product operator (MPO) decomposition of a matrix (lora-over.txt Sec. 4.2, Eq. 3-6, Alg. 1, Eq. 11).

A matrix W (I x J) with I = prod_k i_k and J = prod_k j_k is written as a chain of m cores

    MPO(W) = T(1)[d_0, i_1, j_1, d_1] x T(2)[d_1, i_2, j_2, d_2] x ... x T(m)[d_{m-1}, i_m, j_m, d_m]   (Eq. 3)

where core k owns the row factor i_k and the column factor j_k, neighbouring cores share a bond d_k, and
d_0 = d_m = 1. With the bonds of Eq. 4 the chain holds W exactly; more parameters than W has (Eq. 6) is the
point: LoRA-Over trains the cores and contracts them back into W once training is over.

    i, j = factorize(320, 5), factorize(4, 5) # (16, 1, 1, 1, 20), (2, 1, 1, 1, 2)
    cores = decompose(w, i, j)                # w: (320, 4) -> 5 tensors (d_{k-1}, i_k, j_k, d_k)
    w_again = contract(cores)                 # (320, 4), differentiable
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor


def factorize(n: int, m: int) -> tuple[int, ...]:
    """Return m factors of n: (a, 1, ..., 1, b) with a * b = n, a <= b and a the divisor of n closest to sqrt(n).

    This is the layout of lora-over.txt Tables 5 and 7: the first and last cores carry the real factors, the
    m - 2 middle cores have physical dimensions 1 (e.g. 4096 -> (64, 1, ..., 1, 64), 11008 -> (86, 128)).
    A prime n gives (1, ..., 1, n).
    """
    if not isinstance(n, Integral) or n < 1:
        raise ValueError(f"factorize: n must be a positive integer, got n={n!r}")
    if not isinstance(m, Integral) or m < 2:
        raise ValueError(f"factorize: an MPO needs m >= 2 cores, got m={m!r}")
    a = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    return (a, *([1] * (m - 2)), n // a)


def bond_dims(i_factors: Sequence[int], j_factors: Sequence[int]) -> list[int]:
    """Return the bond dimensions [d_0, ..., d_m] of Eq. 4.

    d_k = min(prod_{p<=k} i_p j_p, prod_{p>k} i_p j_p), so d_0 = d_m = 1. These are the largest ranks the k-th
    unfolding of W can have, so with them the MPO is exact (opdiff never truncates: Eq. 11's error is zero).
    """
    i_f, j_f = _check_factors(i_factors, j_factors)
    sizes = [a * b for a, b in zip(i_f, j_f, strict=True)]
    total = math.prod(sizes)
    dims = []
    left = 1  # prod_{p<=k} i_p j_p
    for k in range(len(sizes) + 1):
        if k > 0:
            left *= sizes[k - 1]
        dims.append(min(left, total // left))
    return dims


def n_add(i_factors: Sequence[int], j_factors: Sequence[int]) -> int:
    """Return Eq. 6, the parameters the MPO adds over the plain matrix: sum_k i_k j_k d_{k-1} d_k - prod_k i_k j_k.

    Bonds are those of `bond_dims` (Eq. 4).
    """
    i_f, j_f = _check_factors(i_factors, j_factors)
    dims = bond_dims(i_f, j_f)
    cores = sum(a * b * dims[k] * dims[k + 1] for k, (a, b) in enumerate(zip(i_f, j_f, strict=True)))
    return cores - math.prod(i_f) * math.prod(j_f)


GAUGES = ("symmetric", "left")
"""Where `decompose` puts W's scale on the chain; see its docstring."""


def decompose(w: Tensor, i_factors: Sequence[int], j_factors: Sequence[int], gauge: str = "symmetric") -> list[Tensor]:
    """Return the MPO cores of `w` (I x J), core k shaped (d_{k-1}, i_k, j_k, d_k), in w's dtype and device.

    Alg. 1: reshape W so that each core's pair (i_k, j_k) is adjacent, then peel one core off per step with an
    SVD (Eq. 5), keeping the d_k largest singular values (the Eq. 4 bonds: all of them, so the MPO is exact). The
    SVDs run in float64.

    Normalization (Alg. 1, last step). Any invertible matrix on a bond can move between its two cores without
    changing the product; `gauge` picks where it goes. "left" is Alg. 1 as written: cores 1..m-1 are the left
    isometries U_k reshaped and the last core is the remaining lambda_{m-1} V^T. "symmetric" (the default): at
    every bond k the product of the cores left of it is
    X_k = U_k sqrt(lambda_k) and the product of those right of it is Y_k = sqrt(lambda_k) V_k^T, where
    U_k lambda_k V_k^T is the SVD of W's k-th unfolding, so X_k^T X_k = Y_k Y_k^T = diag(lambda_k). Alg. 1 as
    written leaves lambda V^T in the next core, which makes every core but the last an isometry and piles all of
    W's scale onto the last core; since a core's gradient is scaled by the product of the other cores, the cores
    would then learn at very different speeds (for a small LoRA matrix the isometries barely move). The symmetric
    gauge is the m-core form of splitting an SVD as U sqrt(S), sqrt(S) V^T, the balanced factorization of a
    product of matrices.

    A bond channel with a (numerically) zero singular value carries nothing; it keeps its isometric column on the
    left and gets zeros on the right, so the product stays exact and the right side still receives gradient.
    For an all-zero `w` this means, in the symmetric gauge: the first core is an isometry, every other core is
    zero and the contraction is exactly zero; with m = 2 the second core still gets gradient, with m >= 3 no core
    does (every term of a core's gradient has another zero core in it). In the left gauge every core but the last
    is an isometry and the last is zero. Use `zero_product_cores` to start an MPO at zero.
    """
    if gauge not in GAUGES:
        raise ValueError(f"unknown MPO gauge {gauge!r}; choose one of: {', '.join(GAUGES)}")
    i_f, j_f = _check_factors(i_factors, j_factors)
    m = len(i_f)
    dims = bond_dims(i_f, j_f)
    mat = _interleaved(w, i_f, j_f).reshape(1, -1)  # (d_0, i_1 j_1 ... i_m j_m)

    # Left-to-right sweep of Alg. 1. After step k, W = U_1 ... U_k (lambda_k V_k^T) with every U an isometry,
    # so lambda_k are the singular values of W's k-th unfolding.
    isometries: list[Tensor] = []  # U_k: (d_{k-1} i_k j_k, d_k)
    spectra: list[Tensor] = []  # lambda_k: (d_k,)
    lives: list[Tensor] = []  # lambda_k above rounding level: (d_k,) bool
    for k in range(m - 1):
        mat = mat.reshape(dims[k] * i_f[k] * j_f[k], -1)  # Alg. 1 line 4
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)  # Eq. 5
        # The usual numerical-rank tolerance: singular values below it are rounding noise of zero.
        tol = s.max() * max(mat.shape) * torch.finfo(s.dtype).eps
        # Both sides of the SVD have at least d_k columns/rows (Eq. 4), so slicing to d_k never runs short.
        u, s, vh = u[:, : dims[k + 1]], s[: dims[k + 1]], vh[: dims[k + 1]]
        u, vh = _canonical(u, vh, s > tol)
        isometries.append(u)
        spectra.append(s)
        lives.append(s > tol)
        mat = s[:, None] * vh  # Alg. 1 line 8: M := lambda V^T, (d_k, rest)

    if gauge == "left":  # Alg. 1: T(k) = U_k reshaped (k < m), T(m) = lambda_{m-1} V^T
        cores = [u.reshape(dims[k], i_f[k], j_f[k], dims[k + 1]) for k, u in enumerate(isometries)]
        cores.append(mat.reshape(dims[m - 1], i_f[m - 1], j_f[m - 1], 1))
        return [c.to(w.dtype) for c in cores]

    # Symmetric gauge: core_k = pinv(sqrt(lambda_{k-1})) U_k sqrt(lambda_k). The prefix product telescopes to
    # U_1 ... U_k sqrt(lambda_k), the last core is pinv(sqrt(lambda_{m-1})) lambda_{m-1} V^T = sqrt(lambda) V^T.
    cores = []
    inv_sqrt_in = mat.new_ones(1)  # pinv(sqrt(lambda_0)), d_0 = 1
    for k, (u, s, live) in enumerate(zip(isometries, spectra, lives, strict=True)):
        # A dead channel keeps its isometric column on the left and gets zeros on the right.
        sqrt_out = torch.where(live, s.sqrt(), torch.ones_like(s))
        core = inv_sqrt_in[:, None, None] * u.reshape(dims[k], i_f[k] * j_f[k], dims[k + 1]) * sqrt_out
        cores.append(core.reshape(dims[k], i_f[k], j_f[k], dims[k + 1]))
        inv_sqrt_in = torch.where(live, s.rsqrt(), torch.zeros_like(s))
    last = inv_sqrt_in[:, None] * mat  # (d_{m-1}, i_m j_m)
    cores.append(last.reshape(dims[m - 1], i_f[m - 1], j_f[m - 1], 1))
    return [c.to(w.dtype) for c in cores]


def _canonical(u: Tensor, vh: Tensor, live: Tensor) -> tuple[Tensor, Tensor]:
    """Fix the SVD's free choices so that nearby matrices get nearby cores.

    An SVD leaves each singular pair's sign free, and any orthonormal basis for the dead channels (zero singular
    values: the bonds of Eq. 4 exceed a LoRA matrix's rank r). LAPACK picks them from rounding noise, so two
    matrices equal to 1e-7 (e.g. the same step computed with another batch split across processes) would get
    unrelated cores and train differently afterwards. Here each live column's largest entry is made positive, and
    the dead columns are the Gram-Schmidt completion of the live ones from the standard basis (their rows of V^T,
    which only ever meet a zero singular value, are zeroed).
    """
    n_live = int(live.sum())  # singular values come sorted, so the live channels lead
    u, vh = u.clone(), vh.clone()
    if n_live:
        peak = u[:, :n_live].abs().argmax(dim=0)
        signs = torch.sign(u[peak, torch.arange(n_live)])
        signs[signs == 0] = 1
        u[:, :n_live] *= signs
        vh[:n_live] *= signs[:, None]
    if n_live < u.shape[1]:
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        q, _ = torch.linalg.qr(torch.cat([u[:, :n_live], eye], dim=1))  # (n, n); q[:, :n_live] = +-live columns
        u[:, n_live:] = q[:, n_live : u.shape[1]]
        vh[n_live:] = 0
    return u, vh


def contract(cores: Sequence[Tensor]) -> Tensor:
    """Return the matrix (prod i_k, prod j_k) that the cores encode (Eq. 3): the exact inverse of `decompose`.

    One matmul per bond, then one permute back from the interleaved (i_1, j_1, ..., i_m, j_m) order; autograd
    flows to every core.
    """
    _check_cores(cores)
    i_f = [c.shape[1] for c in cores]
    j_f = [c.shape[2] for c in cores]
    m = len(cores)
    out = cores[0].reshape(-1, cores[0].shape[-1])  # (i_1 j_1, d_1), since d_0 = 1
    for core in cores[1:]:
        d_in, _, _, d_out = core.shape
        # (prod_{p<k} i_p j_p, d_{k-1}) @ (d_{k-1}, i_k j_k d_k) -> (prod_{p<=k} i_p j_p, d_k)
        out = (out @ core.reshape(d_in, -1)).reshape(-1, d_out)
    interleaved = [f for pair in zip(i_f, j_f, strict=True) for f in pair]
    # (i_1, j_1, ..., i_m, j_m) -> (i_1, ..., i_m, j_1, ..., j_m)
    out = out.reshape(interleaved).permute(*range(0, 2 * m, 2), *range(1, 2 * m, 2))
    return out.reshape(math.prod(i_f), math.prod(j_f))


def contract_batched(cores: Sequence[Tensor]) -> Tensor:
    """Return L matrices (L, prod i_k, prod j_k) from L stacked core chains, each core (L, d_{k-1}, i_k, j_k, d_k).

    The same contraction as `contract`, one batched matmul per bond for all L matrices: this is what keeps
    LoRA-Over's per-step cost independent of how many layers share a shape.
    """
    if not cores or any(c.ndim != 5 or c.shape[0] != cores[0].shape[0] for c in cores):
        raise ValueError("contract_batched needs stacked cores shaped (L, d_{k-1}, i_k, j_k, d_k) with one L")
    _check_cores([c[0] for c in cores])
    n = cores[0].shape[0]
    i_f = [c.shape[2] for c in cores]
    j_f = [c.shape[3] for c in cores]
    m = len(cores)
    out = cores[0].reshape(n, -1, cores[0].shape[-1])  # (L, i_1 j_1, d_1)
    for core in cores[1:]:
        d_in, d_out = core.shape[1], core.shape[-1]
        # (L, prod_{p<k} i_p j_p, d_{k-1}) @ (L, d_{k-1}, i_k j_k d_k) -> (L, prod_{p<=k} i_p j_p, d_k)
        out = torch.bmm(out, core.reshape(n, d_in, -1)).reshape(n, -1, d_out)
    interleaved = [f for pair in zip(i_f, j_f, strict=True) for f in pair]
    out = out.reshape(n, *interleaved).permute(0, *range(1, 2 * m + 1, 2), *range(2, 2 * m + 1, 2))
    return out.reshape(n, math.prod(i_f), math.prod(j_f))


def zero_product_cores(
    i_factors: Sequence[int],
    j_factors: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    gauge: str = "symmetric",
) -> list[Tensor]:
    """Return MPO cores whose product is exactly zero but whose last core still receives gradient.

    A zero matrix has no useful MPO (see `decompose`), yet LoRA's B starts at zero. So a Gaussian matrix with
    entries N(0, 1/J) (the scale of a fan-in initialized weight) is decomposed and its LAST core set to zero:
    the contraction is exactly 0, and the gradient of the last core is the product of the non-zero cores to its
    left times the upstream gradient, so training moves it away from zero at the first step. `gauge` as in
    `decompose` (in the left gauge the non-zero cores are isometries).
    """
    i_f, j_f = _check_factors(i_factors, j_factors)
    rows, cols = math.prod(i_f), math.prod(j_f)
    w = torch.randn(rows, cols, generator=generator, dtype=torch.float64) / math.sqrt(cols)  # (I, J)
    cores = decompose(w, i_f, j_f, gauge)
    cores[-1] = torch.zeros_like(cores[-1])
    return [c.to(dtype) for c in cores]


def _check_factors(
    i_factors: Sequence[int], j_factors: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return the factors as int tuples after checking they describe an MPO of at least two cores."""
    i_f, j_f = tuple(i_factors), tuple(j_factors)
    if any(not isinstance(f, Integral) or isinstance(f, bool) or f < 1 for f in i_f + j_f):
        raise ValueError(f"MPO factors must be positive integers, got i_factors={i_f}, j_factors={j_f}")
    if len(i_f) != len(j_f):
        raise ValueError(
            f"i_factors={i_f} and j_factors={j_f} must have the same length (one (i_k, j_k) pair per core)"
        )
    if len(i_f) < 2:
        raise ValueError(f"an MPO needs at least 2 cores, got i_factors={i_f}, j_factors={j_f}")
    return tuple(int(f) for f in i_f), tuple(int(f) for f in j_f)


def _check_cores(cores: Sequence[Tensor]) -> None:
    """Raise ValueError unless `cores` is a chain of 4-D tensors with matching bonds and d_0 = d_m = 1."""
    if len(cores) == 0:
        raise ValueError("contract needs at least one MPO core, got none")
    shapes = [tuple(c.shape) for c in cores]
    if any(len(s) != 4 for s in shapes):
        raise ValueError(f"MPO cores must be 4-D (d_prev, i, j, d_next), got shapes {shapes}")
    if shapes[0][0] != 1 or shapes[-1][-1] != 1:
        raise ValueError(f"the outer bonds d_0 and d_m must be 1, got core shapes {shapes}")
    for k in range(len(shapes) - 1):
        if shapes[k][-1] != shapes[k + 1][0]:
            raise ValueError(
                f"bond {k + 1} does not match: core {k} ends with {shapes[k][-1]}, core {k + 1} starts with "
                f"{shapes[k + 1][0]}; core shapes {shapes}"
            )


def _interleaved(w: Tensor, i_f: tuple[int, ...], j_f: tuple[int, ...]) -> Tensor:
    """Return w in float64 with axes (i_1, j_1, ..., i_m, j_m) flattened, after checking its shape."""
    if not isinstance(w, Tensor) or w.ndim != 2:
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"MPO decomposition needs a 2-D matrix, got {shape}")
    if not w.is_floating_point():
        raise ValueError(f"MPO decomposition needs a floating-point matrix, got dtype {w.dtype}")
    rows, cols = w.shape
    if math.prod(i_f) != rows:
        raise ValueError(
            f"prod(i_factors)={math.prod(i_f)} != rows={rows} of W {tuple(w.shape)}; i_factors={i_f}"
        )
    if math.prod(j_f) != cols:
        raise ValueError(
            f"prod(j_factors)={math.prod(j_f)} != cols={cols} of W {tuple(w.shape)}; j_factors={j_f}"
        )
    m = len(i_f)
    # (I, J) -> (i_1, ..., i_m, j_1, ..., j_m) -> (i_1, j_1, ..., i_m, j_m): core k's pair becomes adjacent.
    t = w.detach().to(torch.float64).reshape(*i_f, *j_f)
    return t.permute([a for k in range(m) for a in (k, m + k)]).reshape(-1)
