"""The plane chain (tensorconv.accelerators.plane_chain): its build and loading, its forward and
backward against the unfused plan and dense convs, and how auto weighs it."""

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import _loaded_kernel, needs_torch, rel_err, torch
from hypothesis import given
from hypothesis import strategies as st
from test_conv import geometries

from tensorconv import KruskalKernel, conv, plan_conv
from tensorconv.accelerators.plane_chain import PLANE_CHAIN

TOL = 1e-10


def _kernel_module():
    pytest.importorskip("torch")
    from tensorconv.accelerators.plane_chain import _build

    return _build


@needs_torch
@pytest.mark.slow
def test_a_killed_build_does_not_block_the_next(tmp_path):
    """SIGKILL in the middle of the first build (torch leaves its lock file), then build again."""
    import shutil
    import signal
    import time

    from torch.utils.cpp_extension import is_ninja_available

    if _kernel_module().disabled() or not is_ninja_available() or not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip("the CPU fused kernel cannot be built here (no C++ compiler / ninja, or disabled)")
    env = dict(os.environ, TENSORCONV_BUILD_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "tensorconv", "build-kernel"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*.build-*/lock")):
        time.sleep(0.2)
    assert list(tmp_path.glob("*.build-*/lock")), "the first build never started"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "ready" in second.stdout, second.stdout + second.stderr[-2000:]
    assert list(tmp_path.glob("tensorconv_cp_chain_*/tensorconv_cp_chain_*.so"))


@needs_torch
def test_a_built_library_is_imported_without_a_compiler(tmp_path, monkeypatch):
    """An upgrade that leaves the source's content as it was (newer mtime) imports the library;
    one that changes it leaves the kernel out of auto until built: neither compiles in a call."""
    chain = _kernel_module()
    from conftest import _loaded_kernel

    built = _loaded_kernel()._library_path()

    def no_compiler(*args, **kwargs):
        raise AssertionError("a conv call must not build the kernel")

    source = tmp_path / "cp_chain_cpu.cpp"
    source.write_bytes(open(chain._SOURCE, "rb").read())  # same content, newer mtime
    monkeypatch.setattr(chain, "_SOURCE", str(source))
    monkeypatch.setattr(chain, "_build", no_compiler)
    monkeypatch.setattr(chain, "_state", {})
    assert chain._library_path() == built and chain.available() and chain.load() is not None
    k = KruskalKernel.random((64, 64, 3, 3, 3), 64, backend="torch", dtype="float32", seed=0)
    assert "fused (plane chain)" in plan_conv(k, (1, 64, 16, 32, 32), padding=1).estimates

    source.write_bytes(open(chain._SOURCE, "rb").read() + b"\n// changed\n")
    monkeypatch.setattr(chain, "_state", {})
    assert not chain.available()
    plan = plan_conv(k, (1, 64, 16, 32, 31), padding=1)  # a shape not planned before
    assert "fused (plane chain)" not in plan.estimates
    with torch.no_grad():
        conv(torch.randn(1, 64, 16, 32, 31), k, padding=1)


@needs_torch
def test_build_folders_other_users_can_write_are_refused(tmp_path, monkeypatch):
    chain = _kernel_module()

    def never(*args, **kwargs):
        raise AssertionError("nothing may be built or imported from an unsafe folder")

    monkeypatch.setattr(chain, "_build", never)
    monkeypatch.setattr(chain, "_import_library", never)
    root = tmp_path / "shared"
    name = chain._module_name()
    (root / name).mkdir(parents=True)
    (root / name / f"{name}.so").write_bytes(b"planted")
    monkeypatch.setenv("TENSORCONV_BUILD_DIR", str(root))
    root.chmod(0o777)
    monkeypatch.setattr(chain, "_state", {})
    with pytest.warns(RuntimeWarning, match="writable by other users"):
        assert chain.load() is None
    root.chmod(0o700)
    (root / name).chmod(0o775)
    monkeypatch.setattr(chain, "_state", {})
    with pytest.warns(RuntimeWarning, match="writable by other users"):
        assert chain.load() is None
    (root / name).chmod(0o700)
    if os.getuid() == 0:  # root can give the planted file to another user
        os.chown(root / name / f"{name}.so", 65534, 65534)
        monkeypatch.setattr(chain, "_state", {})
        with pytest.warns(RuntimeWarning, match="belongs to uid 65534"):
            assert chain.load() is None


@needs_torch
def test_double_backward_and_torch_func_through_the_plane_chain():
    from conftest import _loaded_kernel

    _loaded_kernel()
    k = KruskalKernel.random((4, 3, 3, 3, 3), 3, backend="torch", seed=0)
    leaves = [k.weights] + list(k.factors)
    for leaf in leaves:
        leaf.requires_grad_(True)
    x = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    second = {}
    for strategy in ("fused", "factorized"):
        plan = plan_conv(k, x.shape, padding=1, strategy=strategy)
        assert (plan.accelerator == "plane_chain") == (strategy == "fused")
        y = conv(x, k, padding=1, strategy=strategy)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        second[strategy] = torch.autograd.grad(g.square().sum(), leaves + [x])
    for a, b in zip(second["fused"], second["factorized"]):
        assert rel_err(a, b) < TOL

    def loss(xx, strategy):
        return conv(xx, k, padding=1, strategy=strategy).square().sum()

    got = torch.func.grad(loss)(x.detach(), "fused")
    assert rel_err(got, torch.func.grad(loss)(x.detach(), "factorized")) < TOL


@contextlib.contextmanager
def _torch_threads(n):
    """torch's intra-op thread count set to ``n`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    whatever strides the rows have. Stated tolerance 1e-5 against the float64 dense conv."""
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


@pytest.mark.parametrize("depth", [1, 2, 5, 11])
@pytest.mark.parametrize("stride0", [1, 2])
def test_plane_chain_ring_of_planes(plane_kernel, depth, stride0):
    """The ring of mode-1 planes holds the span of mode 0's taps: it wraps around mid-image from
    depth 6 on (span 5: 3 taps at dilation 2), and an output plane may read padding only."""
    k = KruskalKernel.random((5, 9, 3, 2, 3), 11, backend="torch", seed=2)
    x = torch.randn(2, 9, depth, 6, 7, dtype=torch.float64)
    lam, u_t, u_c, *spatial = [k.weights] + list(k.factors)
    out_d = (depth + 2 * 2 - 2 * 2 - 1) // stride0 + 1
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
        )
        want = conv(x, k.to_dense(), stride=(stride0, 1, 1), padding=(2, 0, 1), dilation=(2, 1, 1))
    assert rel_err(got.permute(0, 4, 1, 2, 3), want) < TOL


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dims", [(9, 6, 7), (5, 1, 3)])  # (5, 1, 3): fewer output rows than threads
def test_plane_chain_threads_share_an_image(plane_kernel, threads, batch, dims):
    """Below one image per thread every thread runs the chain for its own output rows (the input
    rows its neighbour's taps also read computed by both): any team size, shares of no rows,
    images in turn."""
    k = KruskalKernel.random((5, 4, 3, 3, 3), 19, backend="torch", seed=3)
    x = torch.randn((batch, 4) + dims, dtype=torch.float64)
    lam, u_t, u_c, *spatial = [k.weights] + list(k.factors)
    with _torch_threads(threads):
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
            )
    want = conv(x, k.to_dense(), padding=1)
    assert rel_err(got.permute(0, 4, 1, 2, 3), want) < TOL


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("depth", [1, 2, 7, 12])
@pytest.mark.parametrize("stride0, dilation0", [(1, 1), (2, 1), (1, 2)])
def test_plane_chain_a_team_shares_planes_of_one_row(plane_kernel, threads, depth, stride0, dilation0):
    """Where a plane has fewer output rows than threads (every 1-D and 2-D conv: its planes are
    rows of one position), the team shares the image by output planes instead, each thread with
    its own ring, computing the input planes its planes' taps read (those its neighbour's also
    read computed by both): more threads than planes, strided and dilated mode-0 taps, planes
    whose taps all fall in the padding. float64 against the dense conv at 1e-10."""
    k = KruskalKernel.random((5, 4, 3, 1, 3), 11, backend="torch", seed=depth)
    x = torch.randn((1, 4, depth, 1, 6), dtype=torch.float64)
    geometry = dict(stride=(stride0, 1, 1), padding=(2, 0, 1), dilation=(dilation0, 1, 1))
    want = conv(x, k.to_dense(), **geometry)
    lam, u_t, u_c, *spatial = [k.weights] + list(k.factors)
    with _torch_threads(threads), torch.no_grad():
        got = _chain_forward()(
            x,
            lam,
            u_t,
            u_c,
            spatial,
            out_spatial=tuple(want.shape[2:]),
            stride=geometry["stride"],
            pad_lo=(2, 0, 1),
            dilation=geometry["dilation"],
        )
    assert rel_err(got.permute(0, 4, 1, 2, 3), want) < TOL


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("c, r, t", [(96, 96, 96), (40, 128, 72)])
@pytest.mark.parametrize("stride1, dilation1", [(1, 1), (2, 2)])
def test_plane_chain_blocks_of_the_fused_passes(plane_kernel, threads, c, r, t, stride1, dilation1):
    """Wide ranks: the GEMM C -> R and mode-2 pass, and the mode-0 pass and GEMM R -> T, run
    block by block (~24 KiB of rank-R rows each), so a thread's share is several blocks, the
    last one short and ending in rows that no register tile covers whole. Here a block is 3 or
    5 rows of 10 positions, so the ring of mode-2 rows (the span of the mode-1 taps and one
    block) is shorter than the 13 input rows and wraps around, also with strided and dilated
    mode-1 taps."""
    k = KruskalKernel.random((t, c, 3, 3, 3), r, backend="torch", seed=r)
    x = torch.randn(1, c, 4, 13, 10, dtype=torch.float64)
    lam, u_t, u_c, *spatial = [k.weights] + list(k.factors)
    ho = (13 + 2 - dilation1 * 2 - 1) // stride1 + 1
    with _torch_threads(threads):
        with torch.no_grad():
            got = _chain_forward()(
                x,
                lam,
                u_t,
                u_c,
                spatial,
                out_spatial=(4, ho, 10),
                stride=(1, stride1, 1),
                pad_lo=(1, 1, 1),
                dilation=(1, dilation1, 1),
            )
    want = conv(x, k.to_dense(), padding=1, stride=(1, stride1, 1), dilation=(1, dilation1, 1))
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


def test_plane_chain_keeps_its_scratch_from_call_to_call(chain_calls):
    """The kernel keeps its scratch per thread from call to call, grown where a call needs more:
    made inside torch.inference_mode it serves calls outside it, with and without gradients, at
    larger and smaller shapes and both dtypes (each against the dense conv); free_workspace
    frees what the calling thread keeps."""
    from tensorconv.plans import free_workspace

    k = KruskalKernel.random((8, 6, 3, 3, 3), 5, backend="torch", dtype="float64", seed=0)
    dense = k.to_dense()
    free_workspace()
    cases = [
        (torch.inference_mode, (1, 6, 7, 8, 9), "float32"),
        (torch.no_grad, (1, 6, 7, 8, 9), "float32"),
        (torch.no_grad, (1, 6, 9, 16, 17), "float32"),
        (contextlib.nullcontext, (1, 6, 5, 6, 7), "float32"),
        (torch.no_grad, (1, 6, 9, 16, 17), "float64"),
        (torch.inference_mode, (1, 6, 7, 8, 9), "float64"),
    ]
    for i, (context, shape, dtype) in enumerate(cases):
        x = torch.randn(shape, dtype=getattr(torch, dtype))
        with context():
            got = conv(x, k.astype(dtype), padding=1, strategy="fused")
        assert len(chain_calls) == i + 1
        tol = 1e-5 if dtype == "float32" else 1e-10  # float32: stated 1e-5
        assert rel_err(got.detach(), conv(x.double(), dense, padding=1)) < tol, (context, shape, dtype)
    assert free_workspace() > 0  # the caller's scratch (the team runs an image at batch 1)
    assert free_workspace() == 0


def test_plane_chain_threads_keep_their_own_scratch(chain_calls):
    """Two Python threads running the kernel at once, each on its own inputs, get their own
    results: the scratch kept from call to call is per thread."""
    import threading

    k = KruskalKernel.random((8, 8, 3, 3, 3), 12, backend="torch", dtype="float32", seed=0)
    xs = [torch.randn(1, 8, 6, 20, 20) for _ in range(2)]
    wants = [conv(x.double(), k.astype("float64").to_dense(), padding=1) for x in xs]
    start, errors = threading.Barrier(2), [[], []]

    def work(i):
        start.wait()
        with torch.no_grad():
            for _ in range(20):
                errors[i].append(rel_err(conv(xs[i], k, padding=1, strategy="fused"), wants[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(errors[0]) == len(errors[1]) == 20 and len(chain_calls) == 40
    assert max(errors[0] + errors[1]) < 1e-5  # float32: stated 1e-5


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


def _plane_chain_build():
    pytest.importorskip("torch")
    from tensorconv.accelerators.plane_chain import _build

    return _build


def test_stale_build_cleanup_removes_only_what_tensorconv_made(tmp_path):
    """TENSORCONV_BUILD_DIR may be a user's folder: only tensorconv's own killed builds (its name
    pattern and its marker file) are removed, never a user's folder that merely contains '.build-'."""
    import os

    chain = _plane_chain_build()
    old = 1e9  # 2001: far older than the staleness limit
    user = tmp_path / "app.build-2024"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    mimic = tmp_path / "tensorconv_cp_chain_0123456789ab.build-abc123"  # our name, no marker
    mimic.mkdir()
    (mimic / "data").write_text("mine too")
    ours = tmp_path / "tensorconv_cp_chain_0123456789ab.build-k9x_2z"
    ours.mkdir()
    (ours / chain._MARKER).write_text("")
    (ours / "lock").write_text("")
    fresh = tmp_path / "tensorconv_cp_chain_0123456789ab.build-fresh1"
    fresh.mkdir()
    (fresh / chain._MARKER).write_text("")
    for path in (user, mimic, ours):
        os.utime(path, (old, old))
    chain._remove_stale_builds(str(tmp_path))
    assert (user / "notes.txt").read_text() == "mine" and (mimic / "data").exists()
    assert not ours.exists()
    assert fresh.exists()  # a build that may still be running


def test_a_corrupted_cached_library_is_rebuilt(tmp_path, monkeypatch):
    """A file under the library's own name that does not load (wrong ELF class, truncated): it
    is removed and built again, with a warning naming it; not 'not available' forever."""
    chain = _plane_chain_build()
    monkeypatch.setenv("TENSORCONV_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("TENSORCONV_NO_CPU_KERNEL", raising=False)
    name = chain._module_name()
    folder = tmp_path / name
    folder.mkdir(mode=0o700)
    library = folder / f"{name}.so"
    library.write_bytes(b"\x7fELF\x01 not a library of this machine")
    library.chmod(0o600)
    tmp_path.chmod(0o700)
    built = []

    def rebuild(module_name, root):
        assert not library.exists(), "the broken file must be gone before the rebuild"
        built.append((module_name, root))
        return "the rebuilt module"

    monkeypatch.setattr(chain, "_build", rebuild)
    monkeypatch.setattr(chain, "_state", {})
    with pytest.warns(RuntimeWarning, match=f"{name}.so could not be loaded .*rebuilding it"):
        assert chain.load() == "the rebuilt module"
    assert built == [(name, str(tmp_path))]


@needs_torch
@pytest.mark.slow
def test_plane_chain_built_without_avx512_matches_dense_conv(plane_kernel, tmp_path):
    """The kernel as the pool's CPUs without AVX-512 build it (AVX2 registers in the depthwise
    passes, BLAS for the GEMMs), compiled here with AVX-512 turned off: float32 and float64
    against torch's dense conv3d of the rebuilt kernel in float64 (stated tolerances 1e-5 and
    1e-10), ranks ending in part of a register, 1 to 7 taps (the long-kernel branch)."""
    import torch.nn.functional as F
    from torch.utils.cpp_extension import load

    cpu_flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2 " not in cpu_flags or " fma " not in cpu_flags:
        pytest.skip("this CPU cannot run AVX2 code")
    source = os.path.join(os.path.dirname(plane_kernel.__file__), "cp_chain_cpu.cpp")
    module = load(
        name="cp_chain_avx2_test",
        sources=[source],
        extra_cflags=["-O3", "-march=native", "-mno-avx512f", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(tmp_path),
        verbose=False,
    )
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        for rank, ks in ((3, (1, 3, 2)), (13, (3, 3, 3)), (21, (2, 7, 5)), (40, (3, 1, 4))):
            k = KruskalKernel.random((6, 5) + ks, rank, backend="torch", dtype="float64", seed=rank)
            lam, factors = k.weights.to(dtype), [f.to(dtype) for f in k.factors]
            x = torch.randn(2, 5, 6, 7, 9, dtype=torch.float64)
            pad = tuple(kk // 2 for kk in ks)
            want = F.conv3d(F.pad(x, [p for p in reversed(pad) for _ in (0, 1)]), k.to_dense())
            got = module.cp_chain_forward_kruskal(
                x.to(dtype), lam, *factors, list(want.shape[2:]), [1, 1, 1], list(pad), [1, 1, 1]
            )
            assert rel_err(got.permute(0, 4, 1, 2, 3).double(), want) < tol, (dtype, rank, ks)
