"""CMMD: the MMD distance between two sets of CLIP embeddings (Jayasumana et al. 2024).

Semantics follow the reference implementation (google-research `cmmd/distance.py`):
Gaussian RBF kernel k(a, b) = exp(-gamma ||a - b||^2) with gamma = 1 / (2 sigma^2), sigma = 10,
the biased (minimum-variance) MMD^2 estimator of Gretton et al. 2012, Eq. 5, which keeps the diagonal
terms k(x_i, x_i) in the within-set means, and the result scaled by 1000:

    CMMD(X, Y) = 1000 * (mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j))

Everything is computed in float64, whatever dtype comes in.
"""

from __future__ import annotations

import numpy as np
import torch

SIGMA = 10
"""Bandwidth sigma of the RBF kernel (reference value)."""
CMMD_SCALE = 1000
"""Factor the MMD^2 value is multiplied by, to make the numbers human-readable (reference value)."""

_GAMMA = 1.0 / (2 * SIGMA**2)
# Rows of the left operand per kernel block: bounds memory to _BLOCK_ROWS x m float64 values, so tens of
# thousands of reference embeddings fit where the full n x m matrix would not.
_BLOCK_ROWS = 2048

ArrayLike = np.ndarray | torch.Tensor


def _as_float64_matrix(a: ArrayLike, name: str) -> np.ndarray:
    """Return `a` as a float64 numpy array (torch tensors of any dtype/device included)."""
    if isinstance(a, torch.Tensor):
        # bf16 has no numpy dtype, so convert inside torch first.
        a = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        out = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array of embeddings: {e}") from e
    if out.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_embeddings x dim), got shape {out.shape}")
    if out.shape[0] < 1:
        raise ValueError(f"{name} must hold at least 1 embedding, got shape {out.shape}")
    if out.shape[1] < 1:
        raise ValueError(f"{name} must have embedding dim >= 1, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _l2_normalize(a: np.ndarray, name: str) -> np.ndarray:
    """Return `a` with every row scaled to unit L2 norm."""
    norms = np.linalg.norm(a, axis=1, keepdims=True)  # (n, 1)
    if (norms == 0).any():
        raise ValueError(f"{name} has an all-zero row, which cannot be L2-normalized")
    return a / norms


def _mean_rbf_kernel(a: np.ndarray, b: np.ndarray) -> float:
    """Return mean_ij exp(-gamma ||a_i - b_j||^2) over all n x m pairs, diagonal included."""
    a_sq = np.einsum("id,id->i", a, a)  # (n,)
    b_sq = np.einsum("jd,jd->j", b, b)  # (m,)
    total = 0.0
    for start in range(0, a.shape[0], _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        # ||a||^2 + ||b||^2 - 2 a.b, as the reference does; rounding can push identical points a hair
        # below zero, and a squared distance is never negative.
        sq_dist = a_sq[rows, None] + b_sq[None, :] - 2.0 * (a[rows] @ b.T)  # (block, m)
        total += float(np.exp(-_GAMMA * np.maximum(sq_dist, 0.0)).sum())
    return total / (a.shape[0] * b.shape[0])


def cmmd(x: ArrayLike, y: ArrayLike, normalize: bool = False) -> float:
    """Return CMMD between embedding sets x (n x d) and y (m x d): 1000 x biased MMD^2 with an RBF kernel.

    x and y may be numpy arrays or torch tensors and may differ in their number of rows. The reference
    L2-normalizes embeddings in the feature extractor, not here; `metrics.clip.ClipEmbedder` does the
    same, so its outputs go in as they are. Set `normalize=True` to L2-normalize the rows of raw
    embeddings first. Raises ValueError on non-2-D input, mismatched dims, empty sets or non-finite values.
    """
    xa = _as_float64_matrix(x, "x")
    ya = _as_float64_matrix(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"x and y must have the same embedding dim, got {xa.shape[1]} and {ya.shape[1]}")
    if normalize:
        xa = _l2_normalize(xa, "x")
        ya = _l2_normalize(ya, "y")
    k_xx = _mean_rbf_kernel(xa, xa)
    k_yy = _mean_rbf_kernel(ya, ya)
    k_xy = _mean_rbf_kernel(xa, ya)
    return CMMD_SCALE * (k_xx + k_yy - 2.0 * k_xy)
