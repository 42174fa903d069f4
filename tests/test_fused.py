"""The fused strategy's generic runners equal the unfused plan: tiles (NumPy / CuPy) and
torch.compile (torch); the compiled plane chain has its own tests (test_plane_chain.py)."""

import numpy as np
import pytest
from conftest import rel_err, run_tiled, torch
from hypothesis import given
from hypothesis import strategies as st
from test_conv import geometries

from tensorconv import KruskalKernel, TuckerKernel, conv, plan_conv
from tensorconv.accelerators.plane_chain import PlaneChain
from tensorconv.plans.fused import FusedRunner

TOL = 1e-10


@given(geo=geometries(), data=st.data())
def test_tiled_fused_equals_unfused_numpy(geo, data):
    kind = data.draw(st.sampled_from(["kruskal", "merged", "tucker"]))
    c, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    shape = (t, c) + geo["ks"]
    if kind == "tucker":
        k = TuckerKernel.random(shape, (2, 2), groups=data.draw(st.sampled_from([1, 2])), seed=1)
    else:
        modes = [(0,), (1,), tuple(range(2, len(shape)))] if kind == "merged" and len(shape) > 3 else None
        k = KruskalKernel.random(shape, data.draw(st.integers(1, 4)), modes=modes, seed=1)
    x = np.random.default_rng(0).standard_normal((data.draw(st.integers(1, 2)), c) + geo["dims"])
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], padding_mode=geo["mode"])
    plan = plan_conv(k, x.shape, strategy="fused", **kw)
    tiles = FusedRunner(plan, tile_bytes=data.draw(st.sampled_from([1, 64, 10**9])))  # 1-row tiles .. one tile
    assert rel_err(run_tiled(plan, tiles, x, k), conv(x, k, strategy="factorized", **kw)) < TOL


CASES = [  # (kernel shape, rank, input shape, geometry): N = 1..4, stride, dilation, asymmetric padding
    ((4, 3, 3), 3, (2, 3, 11), dict(padding=((2, 0),), stride=2)),
    ((4, 3, 3, 2), 5, (2, 3, 9, 8), dict(padding=((1, 1), (0, 1)), dilation=(2, 1), padding_mode="reflect")),
    ((5, 3, 3, 3, 3), 4, (1, 3, 6, 7, 5), dict(padding=1, stride=(1, 2, 1))),
    ((3, 2, 2, 3, 2, 2), 3, (1, 2, 4, 5, 3, 4), dict(padding=((1, 0), 1, 0, (0, 1)))),
]


def _compile_works():
    if torch is None or not hasattr(torch, "compile"):
        return False
    try:
        torch.compile(lambda a: a * 2)(torch.ones(2))
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _compile_works(), reason="torch.compile does not work here (no torch or no C++ compiler)")
@pytest.mark.parametrize("case", CASES, ids=["N1", "N2", "N3", "N4"])
def test_compiled_fused_equals_unfused_torch(case, monkeypatch):
    monkeypatch.setattr(PlaneChain, "run", lambda self, *a: None)  # torch.compile's path, here
    shape, rank, in_shape, geo = case
    k = KruskalKernel.random(shape, rank, backend="torch", seed=0)
    x = torch.randn(in_shape, dtype=torch.float64)
    with torch.no_grad():
        fused = conv(x, k, strategy="fused", **geo)
        assert rel_err(fused, conv(x, k, strategy="factorized", **geo)) < TOL
    k32 = k.astype("float32")
    with torch.no_grad():
        got = conv(x.float(), k32, strategy="fused", **geo)
        assert rel_err(got, conv(x.float(), k32, strategy="factorized", **geo)) < 1e-5  # float32: stated 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not _compile_works(), reason="torch.compile does not work here (no torch or no C++ compiler)")
def test_compiled_fused_gradients_match_unfused():
    k = KruskalKernel.random((3, 2, 3, 3), 2, backend="torch", seed=0)
    leaves = [k.weights] + list(k.factors)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    grads = {}
    for strategy in ("fused", "factorized"):
        for leaf in leaves + [x]:
            leaf.grad = None
            leaf.requires_grad_(True)
        conv(x, k, padding=1, stride=(1, 2), strategy=strategy).square().sum().backward()
        grads[strategy] = [leaf.grad.clone() for leaf in leaves + [x]]
    for a, b in zip(grads["fused"], grads["factorized"]):
        assert rel_err(a, b) < TOL


def test_fused_falls_back_when_compile_fails(monkeypatch):
    pytest.importorskip("torch")
    import tensorconv.plans.fused as fused_mod

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    monkeypatch.setattr(fused_mod.CompiledChain, "_warned", False)
    monkeypatch.setattr(PlaneChain, "run", lambda self, *a: None)  # torch.compile's path
    k = KruskalKernel.random((4, 3, 3, 3), 2, backend="torch", seed=7)
    x = torch.randn(1, 3, 7, 9, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="runs unfused"):
        got = conv(x, k, padding=(1, 2), strategy="fused")
    assert rel_err(got, conv(x, k, padding=(1, 2), strategy="factorized")) < TOL


# -- the compiled plane-by-plane CPU kernel (torch, 3-D CP kernels, forward without gradients) --------------
