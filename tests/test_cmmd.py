"""CMMD distance: the properties DESIGN.md section 4 requires, and agreement with a brute-force double loop."""

import importlib
import math

import numpy as np
import pytest
import torch

from metrics import cmmd
from metrics.cmmd import CMMD_SCALE, SIGMA


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force_cmmd(x: np.ndarray, y: np.ndarray) -> float:
    """The biased MMD^2 estimator written out pair by pair, independently of metrics.cmmd."""

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * SIGMA**2))

    k_xx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    k_yy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    k_xy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return CMMD_SCALE * (k_xx + k_yy - 2 * k_xy)


def _point_masses(c: float, n: int, m: int, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """n copies of unit vector u and m copies of unit vector v with u.v = c."""
    u = np.zeros(d)
    u[0] = 1.0
    v = np.zeros(d)
    v[0], v[1] = c, math.sqrt(1.0 - c * c)
    return np.tile(u, (n, 1)), np.tile(v, (m, 1))


def test_constants_match_reference():
    assert SIGMA == 10
    assert CMMD_SCALE == 1000


@pytest.mark.parametrize("n", [1, 7, 50])
def test_identical_sets_give_zero(n):
    x = _unit_rows(np.random.default_rng(0), n, 16)
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("c", "expected"),
    [(0.5, 2000 * (1 - math.exp(-0.5 / 100))), (0.0, 19.900333), (-1.0, 39.602653)],
)
@pytest.mark.parametrize(("n", "m"), [(1, 1), (5, 3)])
def test_point_masses_closed_form(c, expected, n, m):
    # ||u - v||^2 = 2 - 2c, so k_xy = exp(-(1 - c) / 100) and CMMD = 2000 (1 - exp(-(1 - c) / 100)).
    x, y = _point_masses(c, n, m)
    assert cmmd(x, y) == pytest.approx(expected, abs=1e-6)


def test_point_mass_values_from_design():
    assert 2000 * (1 - math.exp(-1 / 100)) == pytest.approx(19.900333, abs=1e-6)
    assert 2000 * (1 - math.exp(-2 / 100)) == pytest.approx(39.602653, abs=1e-6)


def test_matches_brute_force_double_loop():
    rng = np.random.default_rng(1)
    # Unnormalized rows with a spread of norms exercise the kernel beyond the unit sphere.
    x = rng.standard_normal((9, 6)) * 3.0
    y = rng.standard_normal((13, 6)) * 3.0 + 1.0
    expected = _brute_force_cmmd(x, y)
    assert expected > 1.0  # the sets differ, so the check is not 0 == 0
    assert cmmd(x, y) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_blocked_kernel_matches_brute_force_on_many_rows(monkeypatch):
    # Force several row blocks so the blocked sum is checked against the double loop.
    # The package attribute `metrics.cmmd` is the function; the module is reached through importlib.
    monkeypatch.setattr(importlib.import_module("metrics.cmmd"), "_BLOCK_ROWS", 4)
    rng = np.random.default_rng(2)
    x, y = _unit_rows(rng, 11, 5) * 4.0, _unit_rows(rng, 6, 5) * 4.0
    assert cmmd(x, y) == pytest.approx(_brute_force_cmmd(x, y), rel=1e-12)


def test_symmetric():
    rng = np.random.default_rng(3)
    x, y = _unit_rows(rng, 20, 12), _unit_rows(rng, 15, 12)
    assert cmmd(x, y) == pytest.approx(cmmd(y, x), rel=1e-12)


def test_invariant_to_row_order():
    rng = np.random.default_rng(4)
    x, y = _unit_rows(rng, 20, 12), _unit_rows(rng, 15, 12)
    assert cmmd(x[rng.permutation(20)], y[rng.permutation(15)]) == pytest.approx(cmmd(x, y), rel=1e-12)


def test_different_sizes_and_positive_for_different_sets():
    rng = np.random.default_rng(5)
    x = _unit_rows(rng, 3, 10)
    y = _unit_rows(rng, 40, 10)
    value = cmmd(x, y)
    assert isinstance(value, float)
    assert value > 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_torch_and_numpy_inputs_agree(dtype):
    rng = np.random.default_rng(6)
    x, y = _unit_rows(rng, 10, 8), _unit_rows(rng, 12, 8)
    tx, ty = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
    # Same values as numpy once the torch rounding to `dtype` is applied on both sides.
    expected = cmmd(tx.double().numpy(), ty.double().numpy())
    assert cmmd(tx, ty) == pytest.approx(expected, rel=1e-12)
    assert cmmd(tx, y) == pytest.approx(cmmd(tx.double().numpy(), y), rel=1e-12)


def test_computes_in_float64():
    # A difference far below float32 resolution must still register.
    x = np.zeros((1, 2), dtype=np.float32)
    y = np.array([[1e-5, 0.0]])
    assert cmmd(x, y) == pytest.approx(2000 * (1 - math.exp(-1e-10 / 200)), rel=1e-3)
    assert cmmd(x, y) > 0.0


def test_normalize_option():
    rng = np.random.default_rng(7)
    x, y = _unit_rows(rng, 6, 4), _unit_rows(rng, 5, 4)
    scales_x, scales_y = rng.uniform(0.5, 5.0, (6, 1)), rng.uniform(0.5, 5.0, (5, 1))
    assert cmmd(x * scales_x, y * scales_y, normalize=True) == pytest.approx(cmmd(x, y), rel=1e-12)
    assert cmmd(x * scales_x, y * scales_y) != pytest.approx(cmmd(x, y), rel=1e-6)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.ones(4), np.ones((2, 4)), r"x must be 2-D"),
        (np.ones((2, 4)), np.ones((1, 2, 4)), r"y must be 2-D"),
        (np.ones((2, 4)), np.ones((2, 3)), r"same embedding dim, got 4 and 3"),
        (np.ones((0, 4)), np.ones((2, 4)), r"x must hold at least 1 embedding"),
        (np.ones((2, 4)), np.ones((0, 4)), r"y must hold at least 1 embedding"),
        (np.ones((2, 0)), np.ones((2, 0)), r"embedding dim >= 1"),
        (np.array([[1.0, np.nan]]), np.ones((1, 2)), r"x contains NaN or infinite"),
        (np.ones((1, 2)), np.array([[np.inf, 0.0]]), r"y contains NaN or infinite"),
        (np.array([["a", "b"]]), np.ones((1, 2)), r"x must be a numeric array"),
    ],
)
def test_bad_inputs_raise(x, y, match):
    with pytest.raises(ValueError, match=match):
        cmmd(x, y)


def test_normalize_rejects_zero_rows():
    with pytest.raises(ValueError, match=r"x has an all-zero row"):
        cmmd(np.zeros((2, 3)), np.ones((2, 3)), normalize=True)


def test_metrics_imports_nothing_of_the_higher_layers():
    import ast
    from pathlib import Path

    import metrics

    for path in Path(metrics.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"opdiff", "pipelines", "app"} & set(roots), f"{path.name} imports {roots}"
