"""The fused strategy equals the unfused plan: tiles (NumPy / CuPy), torch.compile (torch) and the
compiled plane-by-plane CPU kernel (torch, 3-D CP kernels, no gradients)."""

import numpy as np
import pytest
from conftest import _loaded_kernel, rel_err, run_tiled, torch
from hypothesis import given
from hypothesis import strategies as st
from test_conv import geometries

from tensorconv import KruskalKernel, TuckerKernel, conv, plan_conv
from tensorconv.accelerators.plane_chain import PLANE_CHAIN, PlaneChain
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
def _chain_forward():
    from tensorconv.accelerators.plane_chain._ops import cp_chain_forward

    return cp_chain_forward


RANKS = st.sampled_from([1, 2, 3, 5, 8, 11, 16, 19])


@given(geo=geometries(max_n=3, min_n=1), data=st.data())
def test_plane_chain_equals_dense_conv_float64(chain_calls, geo, data):
    # ranks below, at and past one SIMD register of float64 (8): the kernel's register blocks and tails
    c, t, rank = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(RANKS)
    k = KruskalKernel.random((t, c) + geo["ks"], rank, backend="torch", seed=data.draw(st.integers(0, 99)))
    x = torch.randn((data.draw(st.integers(1, 2)), c) + geo["dims"], dtype=torch.float64)
    if data.draw(st.booleans()) and x.ndim in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], padding_mode=geo["mode"])
    before = len(chain_calls)
    with torch.no_grad():
        got = conv(x, k, strategy="fused", **kw)
    assert len(chain_calls) == before + 1
    # the oracle: torch's dense conv3d with the rebuilt kernel
    assert rel_err(got, conv(x, k.to_dense(), **kw)) < TOL


def test_plane_chain_float32_and_layers(chain_calls):
    """float32 (stated tolerance 1e-5); C, T, R past one SIMD vector; batch 3, stride 2 in depth."""
    k = KruskalKernel.random((24, 20, 3, 3, 3), 37, backend="torch", dtype="float32", seed=3)
    x = torch.randn(3, 20, 9, 10, 11)
    with torch.no_grad():
        got = conv(x, k, stride=(2, 1, 1), padding=1, strategy="fused")
        want = conv(x.double(), k.astype("float64").to_dense(), stride=(2, 1, 1), padding=1)
    assert len(chain_calls) == 1 and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("c, r, t", [(20, 32, 16), (7, 80, 48), (33, 128, 144), (9, 24, 40), (5, 72, 100), (3, 5, 1)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
def test_plane_chain_float32_own_gemm(chain_calls, c, r, t, batch, layout):
    """float32 through the kernel's own GEMMs (AVX-512): one and several column blocks of 64,
    R and T that end in part of a register (24, 40, 72, 100, 5, 1), row counts that are no
    multiple of its register tiles, both layouts. Stated tolerance 1e-5 against the float64
    dense conv."""
    k = KruskalKernel.random((t, c, 3, 2, 3), r, backend="torch", dtype="float32", seed=c)
    x = torch.randn(batch, c, 5, 7, 9)
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        got = conv(x, k, padding=(1, 0, 2), dilation=(1, 1, 2), strategy="fused")
        want = conv(x.double(), k.astype("float64").to_dense(), padding=(1, 0, 2), dilation=(1, 1, 2))
    assert len(chain_calls) == 1 and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


def test_plane_chain_float32_own_gemm_strided_input(chain_calls):
    """A sliced input (channel offset, every other plane and column): the kernel's GEMM reads
    whatever strides the chunk has. Stated tolerance 1e-5 against the float64 dense conv."""
    k = KruskalKernel.random((32, 16, 3, 3, 3), 16, backend="torch", dtype="float32", seed=12)
    x = torch.randn(2, 20, 10, 7, 18)[:, 2:18, ::2, :, ::2]
    assert not x.is_contiguous()
    with torch.no_grad():
        got = conv(x, k, padding=1, strategy="fused")
        want = conv(x.double(), k.astype("float64").to_dense(), padding=1)
    assert len(chain_calls) == 1 and rel_err(got, want) < 1e-5


def test_plane_chain_float32_gradients_own_gemm(chain_calls):
    """float32 backward with C, R, T multiples of 16 (the kernel's own GEMMs for g_o, the input
    gradient and the recomputed first GEMM): every gradient against float64 autograd through the
    unfused steps, stated tolerance 1e-4 (float32 sums over ~10^3 terms)."""
    k64 = KruskalKernel.random((16, 32, 3, 3, 2), 48, backend="torch", seed=8)
    x64 = torch.randn(2, 32, 5, 6, 7, dtype=torch.float64)
    kw = dict(padding=(1, 2, (1, 0)), dilation=(1, 2, 1))
    grads = {}
    for dtype, strategy in ((torch.float32, "fused"), (torch.float64, "factorized")):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in [k64.weights] + list(k64.factors)]
        xg = x64.to(dtype).requires_grad_(True)
        out = conv(xg, KruskalKernel(leaves[0], leaves[1:]), strategy=strategy, **kw)
        weight = torch.from_numpy(np.random.default_rng(2).standard_normal(tuple(out.shape))).to(dtype)
        grads[strategy] = torch.autograd.grad((out * weight).sum(), [xg] + leaves)
    assert len(chain_calls) == 1
    for got, want in zip(grads["fused"], grads["factorized"]):
        assert got.dtype == torch.float32 and rel_err(got.double(), want) < 1e-4


@given(geo=geometries(max_n=3, min_n=1), data=st.data())
def test_plane_chain_gradients_equal_the_unfused_plan_float64(chain_calls, geo, data):
    """Stride 1 (its backward's domain): every gradient, against autograd through the steps."""
    c, t, rank = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(RANKS)
    k = KruskalKernel.random((t, c) + geo["ks"], rank, backend="torch", seed=data.draw(st.integers(0, 99)))
    x = torch.randn((data.draw(st.integers(1, 2)), c) + geo["dims"], dtype=torch.float64)
    kw = dict(padding=geo["padding"], dilation=geo["dilation"], padding_mode=geo["mode"])
    leaves = [k.weights] + list(k.factors)
    grads, outs = {}, {}
    for strategy in ("fused", "factorized"):
        xg = x.clone().requires_grad_(True)
        for leaf in leaves:
            leaf.grad = None
            leaf.requires_grad_(True)
        before = len(chain_calls)
        out = conv(xg, k, strategy=strategy, **kw)
        assert len(chain_calls) == before + (strategy == "fused")
        weight = torch.from_numpy(np.random.default_rng(1).standard_normal(tuple(out.shape)))
        (out * weight).sum().backward()
        outs[strategy] = out.detach()
        grads[strategy] = [xg.grad] + [leaf.grad.clone() for leaf in leaves]
    assert rel_err(outs["fused"], outs["factorized"]) < TOL
    for got, want in zip(grads["fused"], grads["factorized"]):
        assert rel_err(got, want) < TOL


@pytest.mark.parametrize("stride", [(1, 1, 1), (1, 2, 3)])
def test_plane_chain_long_kernels(chain_calls, stride):
    """Kernels of 4-7 taps (past the kernel's unrolled tap counts), wide rank, uneven padding;
    9 channels-first input channels read in place by the own GEMM (K past one register)."""
    k = KruskalKernel.random((6, 9, 7, 4, 6), 19, backend="torch", seed=11)
    x = torch.randn(2, 9, 9, 8, 13, dtype=torch.float64)
    kw = dict(stride=stride, padding=(3, (1, 2), (2, 3)), dilation=(1, 2, 1))
    grad = stride == (1, 1, 1)
    leaves = [k.weights] + list(k.factors)
    for leaf in leaves:
        leaf.requires_grad_(grad)
    xg = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got = conv(xg, k, strategy="fused", **kw)
    assert len(chain_calls) == 1
    with torch.no_grad():
        assert rel_err(got.detach(), conv(x, k.to_dense(), **kw)) < TOL  # the dense conv3d oracle
    if grad:
        weight = torch.randn(got.shape, dtype=torch.float64)
        fused = torch.autograd.grad((got * weight).sum(), [xg] + leaves)
        plain = conv(xg, k, strategy="factorized", **kw)
        unfused = torch.autograd.grad((plain * weight).sum(), [xg] + leaves)
        for a, b in zip(fused, unfused):
            assert rel_err(a, b) < TOL


@pytest.mark.parametrize("planes", [1, 2, 3, 5])
@pytest.mark.parametrize("stride0", [1, 2])
def test_plane_chain_chunks_of_planes(plane_kernel, planes, stride0):
    """Any number of input planes per chunk (the ring of planes wraps around mid-image)."""
    k = KruskalKernel.random((5, 9, 3, 2, 3), 11, backend="torch", seed=2)
    x = torch.randn(2, 9, 11, 6, 7, dtype=torch.float64)
    lam, u_t, u_c, *spatial = [k.weights] + list(k.factors)
    per_plane = 6 * 7 * 11 * 8
    out_d = (11 + 2 * 2 - 2 * 2 - 1) // stride0 + 1
    with torch.no_grad():
        got = _chain_forward()(
            x,
            lam,
            u_t,
            u_c,
            spatial,
            out_spatial=(out_d, 5, 7),
            stride=(stride0, 1, 1),
            pad_lo=(2, 0, 1),
            dilation=(2, 1, 1),
            chunk_bytes=planes * per_plane,
        )
        want = conv(x, k.to_dense(), stride=(stride0, 1, 1), padding=(2, 0, 1), dilation=(2, 1, 1))
    assert rel_err(got.permute(0, 4, 1, 2, 3), want) < TOL


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dims", [(9, 6, 7), (5, 1, 3)])  # (5, 1, 3): fewer rows / positions than threads
def test_plane_chain_threads_share_an_image(plane_kernel, threads, batch, dims):
    """Below one image per thread every thread takes its share of each pass's rows, with barriers
    between the passes: any team size, shares of no rows, several chunks and images in turn."""
    k = KruskalKernel.random((5, 4, 3, 3, 3), 19, backend="torch", seed=3)
    x = torch.randn((batch, 4) + dims, dtype=torch.float64)
    lam, u_t, u_c, *spatial = [k.weights] + list(k.factors)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = _chain_forward()(
                x,
                lam,
                u_t,
                u_c,
                spatial,
                out_spatial=dims,
                stride=(1, 1, 1),
                pad_lo=(1, 1, 1),
                dilation=(1, 1, 1),
                chunk_bytes=2 * dims[1] * dims[2] * 19 * 8,
            )  # 2 planes per chunk
    finally:
        torch.set_num_threads(before)
    want = conv(x, k.to_dense(), padding=1)
    assert rel_err(got.permute(0, 4, 1, 2, 3), want) < TOL


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("c, r, t", [(96, 96, 96), (40, 128, 72)])
def test_plane_chain_blocks_of_the_fused_passes(plane_kernel, threads, c, r, t):
    """Wide ranks: the GEMM C -> R and mode-2 pass, and the mode-0 pass and GEMM R -> T, run
    block by block (~24 KiB of rank-R rows each), so a thread's share is several blocks, the
    last one short and ending in rows that no register tile covers whole."""
    k = KruskalKernel.random((t, c, 3, 3, 3), r, backend="torch", seed=r)
    x = torch.randn(1, c, 4, 9, 10, dtype=torch.float64)
    lam, u_t, u_c, *spatial = [k.weights] + list(k.factors)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = _chain_forward()(
                x,
                lam,
                u_t,
                u_c,
                spatial,
                out_spatial=(4, 9, 10),
                stride=(1, 1, 1),
                pad_lo=(1, 1, 1),
                dilation=(1, 1, 1),
                chunk_bytes=9 * 10 * r * 8,
            )
    finally:
        torch.set_num_threads(before)
    want = conv(x, k.to_dense(), padding=1)
    assert rel_err(got.permute(0, 4, 1, 2, 3), want) < TOL


def test_plane_chain_gradcheck():
    from torch.autograd import gradcheck

    _loaded_kernel()
    k = KruskalKernel.random((3, 2, 3, 2, 3), 2, backend="torch", seed=5)
    leaves = [a.detach().clone().requires_grad_(True) for a in [k.weights] + list(k.factors)]
    x = torch.randn(2, 2, 4, 3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, lam, *factors):
        return conv(x, KruskalKernel(lam, factors), padding=((1, 0), 1, (0, 2)), dilation=(1, 2, 1), strategy="fused")

    assert gradcheck(f, (x, *leaves))


def test_plane_chain_weight_gradients_without_an_input_gradient(chain_calls):
    """A first layer: the input needs no gradient (the kernel then skips the input-gradient GEMM)."""
    k = KruskalKernel.random((4, 3, 3, 2, 3), 3, backend="torch", seed=2)
    x = torch.randn(3, 3, 6, 5, 7, dtype=torch.float64)
    leaves = [k.weights] + list(k.factors)
    grads = {}
    for strategy in ("fused", "factorized"):
        for leaf in leaves:
            leaf.grad = None
            leaf.requires_grad_(True)
        conv(x, k, padding=(1, 0, 1), strategy=strategy).square().sum().backward()
        grads[strategy] = [leaf.grad.clone() for leaf in leaves]
    assert len(chain_calls) == 1 and x.grad is None
    for got, want in zip(grads["fused"], grads["factorized"]):
        assert rel_err(got, want) < TOL


@pytest.mark.parametrize("batch", [1, 3])  # rows split across threads / whole images per thread
def test_plane_chain_under_inference_mode(chain_calls, batch):
    k = KruskalKernel.random((8, 6, 3, 3, 3), 5, backend="torch", dtype="float32", seed=0)
    x = torch.randn(batch, 6, 7, 8, 9)
    with torch.inference_mode():
        got = conv(x, k, padding=1, strategy="fused")
    assert len(chain_calls) == 1
    assert rel_err(got, conv(x.double(), k.astype("float64").to_dense(), padding=1)) < 1e-5  # float32


def test_plane_chain_with_gradients_needs_stride_1(chain_calls, monkeypatch):
    import tensorconv.plans.fused as fused_mod

    monkeypatch.setattr(fused_mod.CompiledChain, "__call__", lambda self, *a: None)  # unfused, quickly
    k = KruskalKernel.random((3, 2, 3, 3, 3), 2, backend="torch", seed=0)
    x = torch.randn(1, 2, 5, 6, 5, dtype=torch.float64, requires_grad=True)
    out = conv(x, k, padding=1, stride=(1, 2, 1), strategy="fused")
    assert out.requires_grad and not chain_calls
    out.sum().backward()
    assert rel_err(out.detach(), conv(x.detach(), k.to_dense(), padding=1, stride=(1, 2, 1))) < TOL
    with torch.no_grad():
        conv(x, k, padding=1, stride=(1, 2, 1), strategy="fused")
    assert len(chain_calls) == 1


def test_plane_chain_can_be_disabled(plane_kernel, chain_calls, monkeypatch):
    monkeypatch.setattr(plane_kernel, "_state", {})
    monkeypatch.setenv("TENSORCONV_NO_CPU_KERNEL", "1")
    assert plane_kernel.load() is None
    assert "TENSORCONV_NO_CPU_KERNEL" in PLANE_CHAIN.status()
    k = KruskalKernel.random((3, 2, 3, 3, 3), 2, backend="torch", seed=0)
    x = torch.randn(1, 2, 5, 5, 5, dtype=torch.float64)
    lam, u_t, u_c, *spatial = [k.weights] + list(k.factors)
    geo = dict(out_spatial=(3, 3, 3), stride=(1, 1, 1), pad_lo=(0, 0, 0), dilation=(1, 1, 1))
    assert _chain_forward()(x, lam, u_t, u_c, spatial, **geo) is None
    monkeypatch.setattr("tensorconv.plans.fused.CompiledChain.__call__", lambda self, *a: None)  # unfused, quickly
    with torch.no_grad():
        got = conv(x, k, strategy="fused")
    assert rel_err(got, conv(x, k.to_dense())) < TOL and len(chain_calls) == 2  # asked, declined


def test_auto_runs_the_plane_chain_once_built_and_never_compiles(chain_calls, monkeypatch):
    """R = C at 64 channels: the plane chain is the cheapest plan (measured 1.0-1.2x faster than
    the unfused order, `tensorconv bench accelerators`); with gradients it runs its own backward."""

    def no_compiler(*args, **kwargs):
        raise AssertionError("auto must not call torch.compile")

    monkeypatch.setattr(torch, "compile", no_compiler)
    k = KruskalKernel.random((64, 64, 3, 3, 3), 64, backend="torch", dtype="float32", seed=0)
    plan = plan_conv(k, (1, 64, 16, 32, 32), padding=1)
    assert plan.strategy == "fused" and "fused (plane chain)" in plan.estimates, plan.estimates
    assert "plane-by-plane" in plan.describe()
    # the chain computes the paper's fewest-MAC order, and the plan counts what it computes
    assert plan.order == "fewest-macs" and plan.macs == 16 * 32 * 32 * 64 * (64 + 64 + 9)
    x = torch.randn(1, 64, 16, 32, 32)
    with torch.no_grad():
        got = conv(x, k, padding=1)
        want = conv(x.double(), k.astype("float64").to_dense(), padding=1)
    assert len(chain_calls) == 1 and rel_err(got, want) < 1e-5  # float32: stated 1e-5
    small = KruskalKernel.random((4, 3, 3, 3, 3), 2, backend="torch", dtype="float64", seed=1)
    xg = torch.randn(1, 3, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    assert plan_conv(small, xg.shape, padding=1).strategy == "fused"
    out = conv(xg, small, padding=1)
    out.sum().backward()
    assert len(chain_calls) == 2 and xg.grad is not None
    assert rel_err(out.detach(), conv(xg.detach(), small.to_dense(), padding=1)) < TOL


def test_auto_leaves_the_plane_chain_out_until_built(plane_kernel, monkeypatch):
    monkeypatch.setattr(plane_kernel, "_state", {"module": None})
    k = KruskalKernel.random((64, 64, 3, 3, 3), 64, backend="torch", dtype="float32", seed=0)
    plan = plan_conv(k, (1, 64, 16, 32, 32), padding=1)
    assert plan.strategy == "factorized" and "fused (plane chain)" not in plan.estimates


def test_auto_reconstructs_where_the_plane_chain_leaves_the_cache(plane_kernel):
    """Params-matched rank (R = 801 at C = 64): the chain's planes no longer fit in cache;
    measured 68 ms against 34 ms for the rebuilt dense kernel (float32), 102 vs 90 ms (float64)."""
    for dtype in ("float32", "float64"):
        k = KruskalKernel.random((64, 64, 3, 3, 3), 801, backend="torch", dtype=dtype, seed=0)
        plan = plan_conv(k, (1, 64, 16, 32, 32), padding=1)
        assert plan.strategy == "reconstructed", plan.estimates
