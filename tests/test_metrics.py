"""tensorconv.metrics against independent formulas: scipy.stats.pearsonr, a direct CCC from
numpy's moments, sklearn-free RMSE / sign counts written out, on numpy and torch."""

import numpy as np
import pytest
from conftest import needs_jax, to_backend, to_numpy, torch
from scipy.stats import pearsonr

from tensorconv.metrics import affect_loss, ccc, pcc, rmse, sagr

BACKENDS = [
    pytest.param(("numpy", None), id="numpy"),
    pytest.param(
        ("torch", "cpu"), id="torch", marks=pytest.mark.skipif(torch is None, reason="torch is not installed")
    ),
    pytest.param(("jax", None), id="jax", marks=needs_jax),
]


def _direct_ccc(y, p):
    cov = np.mean((y - y.mean()) * (p - p.mean()))
    return 2 * cov / (y.var() + p.var() + (y.mean() - p.mean()) ** 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_equal_independent_formulas_batched_over_the_last_axis(backend):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 4, 50))
    p = 0.7 * y + 0.5 * rng.standard_normal((3, 4, 50)) + 0.2
    yb, pb = to_backend(y, backend), to_backend(p, backend)
    got = {name: to_numpy(f(pb, yb)) for name, f in (("rmse", rmse), ("sagr", sagr), ("pcc", pcc), ("ccc", ccc))}
    for name in got:
        assert got[name].shape == (3, 4)
    for i in range(3):
        for j in range(4):
            a, b = y[i, j], p[i, j]
            assert abs(got["rmse"][i, j] - np.sqrt(np.mean((a - b) ** 2))) < 1e-12
            assert abs(got["sagr"][i, j] - np.mean(np.sign(a) == np.sign(b))) < 1e-12
            assert abs(got["pcc"][i, j] - pearsonr(a, b).statistic) < 1e-12
            assert abs(got["ccc"][i, j] - _direct_ccc(a, b)) < 1e-12
    # symmetric in their arguments
    assert np.allclose(to_numpy(ccc(yb, pb)), got["ccc"], rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_signals_give_the_documented_values_not_nan(backend):
    y = to_backend(np.array([1.0, 2.0, 3.0, 4.0]), backend)
    c = to_backend(np.full(4, 2.5), backend)
    assert float(pcc(y, c)) == 0.0
    assert float(pcc(c, c)) == 0.0
    assert float(ccc(c, c)) == 1.0  # the same constant: perfect agreement
    assert float(ccc(c + 1, c)) == 0.0  # different constants: 2 cov / (mean gap^2) = 0
    assert float(ccc(y, c)) == 0.0
    assert float(rmse(c, c)) == 0.0


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_torch_gradients_are_finite_and_match_finite_differences():
    rng = np.random.default_rng(1)
    y = torch.from_numpy(rng.standard_normal(20))
    p = torch.from_numpy(rng.standard_normal(20)).requires_grad_(True)
    for f in (rmse, pcc, ccc):
        assert torch.autograd.gradcheck(lambda q: f(q, y), (p,))
    # at the degenerate points the gradients exist and are finite
    for f, q, t in (
        (rmse, y.clone(), y),
        (pcc, torch.full((20,), 0.3, dtype=torch.float64), y),
        (ccc, torch.full((20,), 0.3, dtype=torch.float64), torch.full((20,), 0.3, dtype=torch.float64)),
    ):
        q.requires_grad_(True)
        f(q, t).backward()
        assert torch.isfinite(q.grad).all(), f.__name__


@pytest.mark.parametrize("backend", BACKENDS)
def test_affect_loss_is_the_papers_weighted_sum(backend):
    rng = np.random.default_rng(2)
    y = rng.standard_normal((30, 2))
    p = y + 0.3 * rng.standard_normal((30, 2))
    yb, pb = to_backend(y, backend), to_backend(p, backend)
    a, b, g = 0.2, 0.5, 0.9
    l_rmse = sum(np.sqrt(np.mean((p[:, k] - y[:, k]) ** 2)) for k in range(2))
    l_pcc = 1 - (pearsonr(p[:, 0], y[:, 0]).statistic + pearsonr(p[:, 1], y[:, 1]).statistic) / 2
    l_ccc = 1 - (_direct_ccc(y[:, 0], p[:, 0]) + _direct_ccc(y[:, 1], p[:, 1])) / 2
    expected = (a * l_rmse + b * l_pcc + g * l_ccc) / (a + b + g)
    assert abs(float(affect_loss(pb, yb, weights=(a, b, g))) - expected) < 1e-12
    # shake-shake: random coefficients, reproducible from a generator of the array's library
    gen = (lambda: torch.Generator().manual_seed(5)) if backend[0] == "torch" else (lambda: np.random.default_rng(5))
    first, again = float(affect_loss(pb, yb, generator=gen())), float(affect_loss(pb, yb, generator=gen()))
    assert first == again
    draws = {float(affect_loss(pb, yb)) for _ in range(5)}
    assert len(draws) > 1  # not a fixed weighting
    lo, hi = min(l_rmse, l_pcc, l_ccc), max(l_rmse, l_pcc, l_ccc)
    assert all(lo - 1e-12 <= d <= hi + 1e-12 for d in draws)  # a convex combination of the three terms


def test_bad_inputs_are_clear_errors():
    y = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*shape \(4, 3\)"):
        pcc(y, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="non-empty last axis"):
        rmse(np.zeros((2, 0)), np.zeros((2, 0)))
    with pytest.raises(TypeError, match="int64"):
        ccc(np.arange(4), np.arange(4))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        affect_loss(np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="weights"):
        affect_loss(y, y, weights=(1, -1, 0))
    with pytest.raises(TypeError, match="generator"):
        affect_loss(y, y, generator=42)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_gives_nan_never_a_perfect_score(backend):
    """NaN in, NaN out, as numpy and scipy: rmse([1, nan, 3], [1, 2, 3]) is not 0, ccc not 1.
    Only the rows with a NaN are NaN; the constant-signal fills stay where there is no NaN."""
    nan = float("nan")
    p = to_backend([[1.0, nan, 3.0], [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], backend)
    y = to_backend([[1.0, 2.0, 3.0], [1.0, nan, 3.0], [2.0, 2.0, 2.0]], backend)
    for f in (rmse, sagr, pcc, ccc):
        got = to_numpy(f(p, y))
        assert np.isnan(got[:2]).all(), (f.__name__, got)
        assert not np.isnan(got[2]), (f.__name__, got)
    assert to_numpy(ccc(p, y))[2] == 1.0 and to_numpy(pcc(p, y))[2] == 0.0
    v = to_backend([[0.1, nan], [0.4, 0.3], [-0.5, 0.6], [0.2, 0.0]], backend)
    w = to_backend([[0.1, 0.2], [0.4, 0.3], [-0.5, 0.6], [0.2, 0.0]], backend)
    assert np.isnan(to_numpy(affect_loss(v, w, weights=(1, 1, 1))))
    assert np.isnan(to_numpy(affect_loss(w, v, weights=(0, 0, 1))))


def test_affect_loss_refuses_non_finite_weights():
    y = np.array([[0.1, -0.2], [0.4, 0.3], [-0.5, 0.6]])
    for weights in ((float("nan"), 1, 1), (1, float("inf"), 1), (1, 1), (-1, 1, 1)):
        with pytest.raises(ValueError, match="weights="):
            affect_loss(y, y, weights=weights)
