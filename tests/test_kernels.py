import copy

import numpy as np
import pytest
import tensorly as tl
from conftest import rel_err, to_numpy, torch
from hypothesis import given
from hypothesis import strategies as st
from tensorly.cp_tensor import cp_to_tensor
from tensorly.tucker_tensor import tucker_to_tensor

from tensorconv import KruskalKernel, TuckerKernel

DTYPE_TOL = {"float64": 1e-12, "float32": 1e-5}
kernel_shapes = st.lists(st.integers(1, 5), min_size=3, max_size=6).map(tuple)


def _backend_name(backend):
    return backend[0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(shape=kernel_shapes, rank=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_kruskal_to_dense_matches_tensorly(backend, dtype, shape, rank, seed):
    k = KruskalKernel.random(shape, rank, backend=backend[0], dtype=dtype, device=backend[1], seed=seed)
    w = to_numpy(k.weights).astype(np.float64)
    fs = [to_numpy(f).astype(np.float64) for f in k.factors]
    expected = cp_to_tensor((w, fs))
    dense = k.to_dense()
    assert k.backend.dtype_name(dense).endswith(dtype)
    assert rel_err(dense, expected) < DTYPE_TOL[dtype]


def test_acceptance_torch_kruskal_equals_tensorly():
    pytest.importorskip("torch")
    k = KruskalKernel.random((32, 16, 3, 3, 3), rank=8, backend="torch")
    with tl.backend_context("pytorch"):
        expected = tl.cp_to_tensor((k.weights, k.factors))
    assert float((k.to_dense() - expected).abs().max()) <= 1e-12


@given(
    seed=st.integers(0, 2**16),
    rank=st.integers(1, 5),
    merged=st.sampled_from([[(0,), (1,), (2, 3)], [(0, 2), (1, 3, 4)], [(1, 0), (2,), (3,)], [(0,), (1, 3), (2,)]]),
)
def test_merged_modes_match_grouped_cp(seed, rank, merged):
    n_modes = max(m for g in merged for m in g) + 1
    shape = tuple([3, 4, 2, 3, 2][:n_modes])
    k = KruskalKernel.random(shape, rank, modes=merged, seed=seed)
    # oracle: tensorly CP over the grouped (reshaped) modes, then un-group
    grouped = cp_to_tensor((k.weights, [f.reshape(-1, rank) for f in k.factors]))
    order = [m for g in merged for m in g]
    full = grouped.reshape([shape[m] for m in order])
    expected = np.transpose(full, np.argsort(order))
    assert rel_err(k.to_dense(), expected) < 1e-12


@given(shape=kernel_shapes, rank=st.integers(1, 6))
def test_n_params_is_papers_formula(shape, rank):
    k = KruskalKernel.random(shape, rank)
    t, c, ks = shape[0], shape[1], shape[2:]
    assert k.n_params == rank * (c + t + sum(ks)) + rank
    assert k.dense_params == int(np.prod(shape))


def test_identity_factors():
    rng = np.random.default_rng(0)
    r = 4
    spatial = rng.standard_normal((3, 3, r))
    u_t = rng.standard_normal((6, r))
    k = KruskalKernel(np.ones(r), [u_t, None, spatial], modes=[(0,), (1,), (2, 3)])  # MobileNet v1
    assert k.shape == (6, r, 3, 3)
    expected = np.einsum("tr,sr,hwr->tshw", u_t, np.eye(r), spatial)
    assert rel_err(k.to_dense(), expected) < 1e-14
    assert k.n_params == 6 * r + 9 * r + r


@pytest.mark.parametrize("groups", [1, 2, 3])
@given(seed=st.integers(0, 2**16), spatial_rank=st.sampled_from([None, 2]))
def test_tucker_to_dense_matches_tensorly(backend, groups, seed, spatial_rank):
    shape = (5, 4, 3, 2)
    rank = (2 * groups, groups)
    k = TuckerKernel.random(
        shape, rank, groups=groups, spatial_rank=spatial_rank, backend=backend[0], device=backend[1], seed=seed
    )
    core = to_numpy(k.core)
    fs = [None if f is None else to_numpy(f) for f in k.factors]
    # oracle: the sum of `groups` independent Tucker blocks
    expected = 0
    og, ig = rank[0] // groups, rank[1] // groups
    for g in range(groups):
        block = core[g * og : (g + 1) * og]
        factors = [fs[0][:, g * og : (g + 1) * og], fs[1][:, g * ig : (g + 1) * ig]]
        factors += [np.eye(block.shape[2 + j]) if f is None else f for j, f in enumerate(fs[2:])]
        expected = expected + tucker_to_tensor((block, factors))
    assert rel_err(k.to_dense(), expected) < 1e-12
    assert k.n_params == core.size + sum(f.size for f in fs if f is not None)


def test_round_trips_tensorly_and_backends():
    pytest.importorskip("torch")
    k = KruskalKernel.random((4, 3, 3, 2), rank=3, seed=1)
    back = KruskalKernel.from_tensorly(k.to_tensorly())
    assert rel_err(back.to_dense(), k.to_dense()) == 0
    kt = k.to_backend("torch")
    assert kt.backend.name == "torch" and str(kt.dtype) == "torch.float64"
    assert rel_err(kt.to_backend("numpy").to_dense(), k.to_dense()) == 0
    assert kt.to_backend("torch", dtype="float32").dtype == torch.float32
    t = TuckerKernel.random((4, 3, 3, 2), (2, 3), seed=2)
    tb = TuckerKernel.from_tensorly(t.to_tensorly())
    assert rel_err(tb.to_dense(), t.to_dense()) < 1e-14
    with pytest.raises(ValueError, match="merged"):
        KruskalKernel.random((3, 3, 2, 2), 2, modes=[(0,), (1,), (2, 3)]).to_tensorly()


def test_from_dense_recovers_low_rank_and_leaves_tensorly_backend(backend):
    if backend[0] == "cupy":
        pytest.importorskip("cupy")
    before = tl.get_backend()
    exact = KruskalKernel.random((6, 5, 3, 3), rank=2, backend=backend[0], device=backend[1], seed=3)
    k = KruskalKernel.from_dense(exact.to_dense(), rank=2, n_iter_max=500, tol=1e-14)
    assert tl.get_backend() == before
    assert k.backend.name == backend[0] and k.device == exact.device
    assert k.relative_error(exact.to_dense()) < 1e-6
    tk = TuckerKernel.from_dense(
        TuckerKernel.random((6, 5, 3, 3), (3, 2), backend=backend[0], device=backend[1], seed=4).to_dense(), rank=(3, 2)
    )
    assert tl.get_backend() == before
    assert tk.rank[:2] == (3, 2)


def test_from_dense_merged_modes():
    exact = KruskalKernel.random((5, 4, 3, 3), rank=3, modes=[(0,), (1,), (2, 3)], seed=5)
    k = KruskalKernel.from_dense(exact.to_dense(), rank=3, modes=[(0,), (1,), (2, 3)], n_iter_max=1000, tol=1e-14)
    assert k.modes == exact.modes
    assert k.relative_error(exact.to_dense()) < 1e-6


def test_from_dense_rejects_non_finite():
    w = np.ones((3, 3, 2, 2))
    w[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="weight contains NaN"):
        KruskalKernel.from_dense(w, 2)


def test_validation_errors_name_the_argument():
    rng = np.random.default_rng(0)
    u = [rng.standard_normal(s) for s in [(4, 3), (5, 3), (3, 3)]]
    with pytest.raises(ValueError, match=r"disagree on the rank.*\(5, 2\)"):
        KruskalKernel(np.ones(3), [u[0], rng.standard_normal((5, 2)), u[2]])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        KruskalKernel(np.ones(0), [np.zeros((4, 0)), np.zeros((5, 0)), np.zeros((3, 0))])
    with pytest.raises(ValueError, match="weights must be a vector"):
        KruskalKernel(np.ones((3, 1)), u)
    with pytest.raises(ValueError, match="at least 3 modes"):
        KruskalKernel(np.ones(3), u[:2])
    with pytest.raises(ValueError, match=r"factors\[2\] spans modes \(2, 3\)"):
        KruskalKernel(np.ones(3), u, modes=[(0,), (1,), (2, 3)])
    with pytest.raises(ValueError, match="exactly once"):
        KruskalKernel(np.ones(3), u, modes=[(0,), (0,), (2,)])
    with pytest.raises(TypeError, match="float32"):
        KruskalKernel(np.ones(3, dtype=np.float32), u)
    with pytest.raises(ValueError, match="rank=0: expected an int >= 1"):
        KruskalKernel.random((3, 3, 3), 0)
    with pytest.raises(ValueError, match=r"factors\[1\] must have shape \(dim, 2\)"):
        TuckerKernel(np.zeros((2, 2, 3)), [np.zeros((4, 2)), np.zeros((5, 3))])
    with pytest.raises(ValueError, match="not divisible by groups=2"):
        TuckerKernel(np.zeros((3, 1, 3)), [None, None], groups=2)
    if torch is not None:
        with pytest.raises(TypeError, match="mixed|different libraries"):
            KruskalKernel(np.ones(3), [torch.zeros(4, 3), u[1], u[2]])


def test_transduct_shapes_dtype_and_frame_equivalence():
    k = KruskalKernel.random((4, 3, 3, 3), rank=2, dtype="float64", seed=0)
    k3 = k.transduct(5, position=0, init="center")
    assert k3.shape == (4, 3, 5, 3, 3) and k3.dtype == np.float64 and k3.rank == 2
    dense3, dense2 = k3.to_dense(), k.to_dense()
    assert rel_err(dense3[:, :, 2], dense2) < 1e-14
    assert np.all(dense3[:, :, [0, 1, 3, 4]] == 0)
    ones = k.transduct(2, position=2, init="ones")
    assert ones.shape == (4, 3, 3, 3, 2)
    assert rel_err(ones.to_dense()[..., 1], dense2) < 1e-14
    merged = KruskalKernel.random((4, 3, 3, 3), 2, modes=[(0,), (1,), (2, 3)], seed=1).transduct(3)
    assert merged.modes == [(0,), (1,), (2,), (3, 4)]
    with pytest.raises(ValueError, match="init="):
        k.transduct(3, init="zeros")
    if torch is not None:
        kt = k.to_backend("torch", dtype="float64")
        assert kt.transduct(3).factors[2].dtype == torch.float64


def test_repr_and_properties():
    k = KruskalKernel.random((8, 4, 3, 3), rank=2, seed=0)
    text = repr(k)
    assert "shape=(8, 4, 3, 3)" in text and "rank=2" in text and "numpy" in text and "params=38 vs dense 288" in text
    assert k.n_spatial == 2 and k.kernel_size == (3, 3)
    t = TuckerKernel.random((8, 4, 3, 3), (4, 2), groups=2, seed=0)
    assert "groups=2" in repr(t) and t.rank == (4, 2, 3, 3)
    assert copy.deepcopy(k).shape == k.shape


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_decompose_in_float32_and_keep_their_dtype(dtype):
    """No half-precision eigh / solve on CPU: the solvers run in float32, the kernel comes back in
    the weight's dtype and fits as the float32 decomposition does (to the half dtype's rounding)."""
    w32 = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    w = w32.to(getattr(torch, dtype))
    for cls, rank in ((KruskalKernel, 4), (TuckerKernel, (3, 3))):
        k = cls.from_dense(w, rank)
        assert k.dtype == w.dtype
        ref = cls.from_dense(w.float(), rank).relative_error(w.float())
        assert abs(k.relative_error(w) - ref) < 0.02


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_to_dense_inside_autocast_is_the_kernels_own_product():
    rng = np.random.default_rng(1)
    core, u_t, u_c = rng.standard_normal((2, 3, 3, 3)), rng.standard_normal((4, 2)), rng.standard_normal((5, 3))
    lam, *cp_factors = [rng.standard_normal(s) for s in ((3,), (4, 3), (5, 3), (3, 3), (3, 3))]
    cases = [
        (TuckerKernel(*_f32(core), _f32(u_t, u_c)), np.einsum("abkl,ta,cb->tckl", core, u_t, u_c)),
        (KruskalKernel(*_f32(lam), _f32(*cp_factors)), np.einsum("r,tr,cr,kr,lr->tckl", lam, *cp_factors)),
    ]
    for k, want in cases:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = k.to_dense()
        assert got.dtype == torch.float32
        assert rel_err(got, want) < 1e-6  # float32


def _f32(*arrays):
    return [torch.tensor(a, dtype=torch.float32) for a in arrays]


def test_integral_ranks_of_any_library_are_accepted():
    assert KruskalKernel.random((4, 3, 3), np.int64(2), seed=0).rank == 2
    if torch is not None:
        assert KruskalKernel.random((4, 3, 3), torch.tensor(3), seed=0).rank == 3
    for bad, error in ((2.0, TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(error, match="rank="):
            KruskalKernel.random((4, 3, 3), bad, seed=0)
