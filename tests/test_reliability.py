"""Regression tests of issue #19: silent wrong results, crashes, hangs and validation gaps.

Crashes and hangs are run in a subprocess (a segfault or a wait must fail the test, not the run).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import rel_err, torch

from tensorconv import KruskalKernel, TuckerKernel, conv, plan_conv

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
TOL = 1e-10


def _run_python(code, timeout=300, env=None):
    """Run ``code`` in a fresh interpreter; returns the completed process (never raises on rc)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=full_env
    )


# -- 1. strided pointwise steps: float32 gradients ---------------------------------------------------------------
@needs_torch
def test_strided_pointwise_steps_are_not_strided_native_convs(monkeypatch):
    """A strided 1x1 step runs as a subsampled GEMM: oneDNN's strided 1x1 convs on channels-last
    views gave wrong weight gradients (and crashed with one thread) for a few channel counts."""
    import torch.nn.functional as F

    from tensorconv.nn import KruskalConv, TuckerConv

    seen = []
    for name in ("conv1d", "conv2d", "conv3d"):
        real = getattr(F, name)

        def spy(x, w, *args, _real=real, **kw):
            stride = args[1] if len(args) > 1 else kw.get("stride", 1)
            if all(k == 1 for k in w.shape[2:]) and any(s != 1 for s in np.atleast_1d(stride)):
                seen.append((tuple(w.shape), stride))
            return _real(x, w, *args, **kw)

        monkeypatch.setattr(F, name, spy)
    for layer in (
        KruskalConv(2, 3, (1, 1), rank=2, stride=2, strategy="factorized"),
        TuckerConv(4, 3, (1, 1, 1), rank=2, stride=(2, 1, 3), strategy="factorized"),
    ):
        x = torch.randn((2, layer.in_channels) + (7,) * layer.n_spatial, requires_grad=True)
        layer(x).square().sum().backward()
    assert seen == []


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_strided_pointwise_float32_gradients_match_float64(threads):
    code = f"""
    import itertools, torch
    torch.set_num_threads({threads})
    from tensorconv.nn import KruskalConv, TuckerConv
    worst = 0.0
    for cls, c, stride, ks in itertools.product((KruskalConv, TuckerConv), (1, 2, 3, 4, 7, 16), (2, 3),
                                                ((1, 1), (1, 1, 1), (1, 3))):
        torch.manual_seed(c)
        rank = 2 if cls is KruskalConv else (2, min(2, c))
        l64 = cls(c, 3, ks, rank=rank, stride=stride, strategy="factorized", dtype=torch.float64)
        l32 = cls(c, 3, ks, rank=rank, stride=stride, strategy="factorized")
        l32.load_state_dict({{k: v.float() for k, v in l64.state_dict().items()}})
        x = torch.randn((2, c) + (9,) * len(ks), dtype=torch.float64)
        l64(x).square().sum().backward()
        l32(x.float()).square().sum().backward()
        for (name, a), (_, b) in zip(l64.named_parameters(), l32.named_parameters()):
            worst = max(worst, float((a.grad - b.grad.double()).abs().max() / a.grad.abs().max()))
    print("worst", worst)
    assert worst < 1e-4, worst  # float32 against float64: stated 1e-4
    """
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


# -- 2. conv subclasses with their own forward (timm's Conv2dSame) ------------------------------------------------
def _conv2d_same_class():
    import math

    import torch.nn.functional as F

    class Conv2dSame(torch.nn.Conv2d):
        """As timm's: TF-style 'same' padding worked out from each input's size."""

        def forward(self, x):
            ih, iw = x.shape[-2:]
            pads = []
            for size, k, s, d in zip((ih, iw), self.kernel_size, self.stride, self.dilation):
                pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
            x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    return Conv2dSame


@needs_torch
def test_conv_subclasses_with_their_own_forward_are_refused():
    from tensorconv.architectures import from_torch
    from tensorconv.nn import KruskalConv, TuckerConv

    same = _conv2d_same_class()(4, 6, 3, stride=2).double()
    assert same(torch.randn(1, 4, 28, 28, dtype=torch.float64)).shape[-1] == 14  # what a conversion must keep
    for convert in (
        lambda m: KruskalConv.from_conv(m, 4),
        lambda m: TuckerConv.from_conv(m, (4, 4)),
        lambda m: from_torch(torch.nn.Sequential(m)),
    ):
        with pytest.raises(TypeError, match="Conv2dSame subclasses nn.Conv2d with its own forward"):
            convert(same)

    class Plain(torch.nn.Conv2d):  # a subclass that keeps torch's forward is an ordinary conv
        pass

    plain = Plain(4, 6, 3, padding=1).double()
    layer = KruskalConv.from_conv(plain, 24)
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    assert layer(x).shape == plain(x).shape


# -- 3. grouped Tucker: stored and budgeted per group ---------------------------------------------------------------
def _block_diagonal_oracle(k):
    """The full (T, C, *K) kernel of a grouped-conv Tucker kernel, group by group with numpy."""
    g = k.groups
    t, c = k.shape[:2]
    tg, cg = t // g, c // g
    core = np.asarray(k.core)
    og = core.shape[0] // g
    full = np.zeros(k.shape)
    for j in range(g):
        block = core[j * og : (j + 1) * og]
        for n, f in enumerate(k.factors[2:]):
            if f is not None:
                block = np.moveaxis(np.tensordot(block, np.asarray(f), axes=([2 + n], [1])), -1, 2 + n)
        u_t = np.asarray(k.factors[0])[j * tg : (j + 1) * tg]
        u_c = np.asarray(k.factors[1])[j * cg : (j + 1) * cg]
        full[j * tg : (j + 1) * tg, j * cg : (j + 1) * cg] = np.einsum("oi...,to,si->ts...", block, u_t, u_c)
    return full


@pytest.mark.parametrize("spatial_rank", [None, 2])
@pytest.mark.parametrize("strategy", ["factorized", "reconstructed", "fused", "auto"])
def test_grouped_conv_tucker_kernel_equals_its_blocks(spatial_rank, strategy):
    k = TuckerKernel.random((8, 6, 3, 3), (4, 6), groups=2, grouped_conv=True, spatial_rank=spatial_rank, seed=3)
    assert k.block_diagonal == (True, True) and k.is_grouped_conv
    assert k.dense_params == 8 * 3 * 9 and k.n_params == 4 * 3 * int(np.prod(k.core.shape[2:])) + 8 * 2 + 6 * 3 + (
        0 if spatial_rank is None else 2 * 3 * 2
    )
    oracle = _block_diagonal_oracle(k)
    assert rel_err(k.to_dense(), oracle) < TOL
    x = np.random.default_rng(0).standard_normal((2, 6, 7, 8))
    want = conv(x, oracle, padding=1, stride=(2, 1))
    assert rel_err(conv(x, k, padding=1, stride=(2, 1), strategy=strategy), want) < TOL
    assert rel_err(conv(x, k.to_grouped_dense(), groups=2, padding=1, stride=(2, 1)), want) < TOL


@needs_torch
def test_grouped_conv_from_conv_compresses_and_stays_grouped():
    """resnext50's grouped 3x3 conv (128 channels, 32 groups): the factorized layer is smaller
    than the grouped conv, says so honestly, and converts back to a grouped conv."""
    from tensorconv.nn import TuckerConv

    torch.manual_seed(0)
    dense = torch.nn.Conv2d(128, 128, 3, padding=1, groups=32, bias=False).double()
    x = torch.randn(2, 128, 8, 8, dtype=torch.float64)
    for rank in ("same", 0.5):
        layer = TuckerConv.from_conv(dense, rank)
        assert layer.groups == 32 and layer.dense_params == 4608
        assert layer.n_params <= (1.0 if rank == "same" else 0.5) * 4608, (rank, layer.n_params)
        assert "x fewer" in repr(layer) and "dense 4608" in repr(layer)
        back = layer.to_dense_conv()
        assert back.groups == 32 and tuple(back.weight.shape) == (128, 4, 3, 3)
        assert rel_err(back(x), layer(x).detach()) < TOL
    full = TuckerConv.from_conv(dense, (128, 128))  # full rank per group: exact
    assert full.relative_error < 1e-12 and rel_err(full(x).detach(), dense(x).detach()) < TOL


@needs_torch
def test_repr_says_more_when_the_factorization_is_larger():
    from tensorconv.nn import KruskalConv

    assert "x more" in repr(KruskalConv(2, 2, (3, 3), rank=20))


# -- 4. torch.jit ----------------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_jit_trace_is_shape_generic(padding_mode):
    from tensorconv.nn import HOCPBlock, KruskalConv, TuckerConv

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        KruskalConv(4, 8, (3, 3, 3), rank=6, padding=1, padding_mode=padding_mode, strategy="fused"),
        torch.nn.ReLU(),
        TuckerConv(8, 8, (3, 3, 3), rank=(4, 4), padding=(1, (0, 2), 1), groups=2),
        HOCPBlock(8, 6, (1, 3, 3), rank=3, padding="same"),
    ).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 4, 6, 10, 10))
        for shape in [(1, 4, 5, 7, 9), (3, 4, 8, 6, 11)]:
            x = torch.randn(shape)
            got, want = traced(x), model(x)
            assert got.shape == want.shape and rel_err(got, want) < 1e-5  # float32: stated 1e-5


@needs_torch
def test_jit_script_and_bare_conv_tracing_say_why():
    from tensorconv.nn import KruskalConv

    with pytest.raises(RuntimeError, match="torch.jit.script"):
        torch.jit.script(torch.nn.Sequential(KruskalConv(2, 3, (3, 3), rank=2)))
    k = KruskalKernel.random((3, 2, 3, 3), 2, backend="torch", dtype="float32", seed=0)
    with pytest.raises(RuntimeError, match="trace the layers"):
        torch.jit.trace(lambda x: conv(x, k), torch.randn(1, 2, 5, 5))


# -- 5. SVD init where it cannot work ---------------------------------------------------------------------------
@needs_torch
def test_from_conv_rank_beyond_the_svd_init():
    from tensorconv.nn import KruskalConv

    torch.manual_seed(0)
    stem = torch.nn.Conv2d(3, 64, 3, padding=1).double()  # mode 0's unfolding has 3 * 3 * 3 = 27 columns
    layer = KruskalConv.from_conv(stem, 40, method="tensorly")
    assert layer.rank == 40 and layer.relative_error < 1e-3, layer.relative_error
    with pytest.raises(ValueError, match="init='random'"):
        KruskalConv.from_conv(stem, 40, method="tensorly", init="svd")
    # the default ALS pads its SVD init with random columns beyond a mode's size
    als = KruskalConv.from_conv(stem, 40, n_iter_max=300, tol=0)
    assert als.rank == 40 and als.relative_error < 1e-3, als.relative_error


# -- 6, 7, 9. building and loading the compiled kernel ----------------------------------------------------------------
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


# -- 10, 11. empty batches, integer inputs --------------------------------------------------------------------------
def _kernels(backend, shape):
    return [
        KruskalKernel.random(shape, 2, backend=backend, seed=0),
        TuckerKernel.random(shape, (2, 2), backend=backend, seed=0),
        TuckerKernel.random((4, 2) + shape[2:], (2, 2), groups=2, grouped_conv=True, backend=backend, seed=0),
    ]


@pytest.mark.parametrize("backend", ["numpy", pytest.param("torch", marks=[needs_torch, pytest.mark.slow])])
@pytest.mark.parametrize("spatial", [(3,), (3, 1), (3, 3, 3), (1, 1, 1)])
def test_empty_batch_gives_the_empty_output(backend, spatial):
    shape = (4, 2) + spatial
    for k in _kernels(backend, shape):
        for strategy in ("factorized", "fused", "reconstructed", "auto"):
            for dtype in ("float32", "float64"):
                kk = k.astype(dtype)
                x = np.zeros((0, 2) + (6,) * len(spatial), dtype=dtype)
                want = (0, 4) + tuple((6 + 2 - s) // 2 + 1 for s in spatial)  # padding 1, stride 2
                if backend == "torch":
                    x = torch.from_numpy(x).requires_grad_(True)
                out = conv(x, kk, stride=2, padding=1, strategy=strategy)
                assert tuple(out.shape) == want, (type(k).__name__, strategy, dtype)
                if backend == "torch":
                    out.sum().backward()
                    assert x.grad is not None and tuple(x.grad.shape) == tuple(x.shape)


def test_integer_inputs_are_refused():
    x = np.full((1, 3, 8, 8), 100, dtype=np.int8)  # computed in int8, 540000 would wrap to 96
    with pytest.raises(TypeError, match="x has dtype int8"):
        conv(x, np.ones((4, 3, 3, 3), dtype=np.int8))
    with pytest.raises(TypeError, match="floating"):
        conv(x.astype(np.int64), np.ones((4, 3, 3, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="kernel has dtype"):
        conv(np.ones((1, 3, 8, 8)), np.ones((4, 3, 3, 3), dtype=np.int32))
    if torch is not None:
        with pytest.raises(TypeError, match="x has dtype int32"):
            conv(torch.ones(1, 3, 8, 8, dtype=torch.int32), torch.ones(4, 3, 3, 3, dtype=torch.int32))


# -- 12. higher-order gradients with the compiled kernel ---------------------------------------------------------------
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


# -- 15. CLI -----------------------------------------------------------------------------------------------------------
def test_verify_seed_is_reproducible_across_processes():
    code = """
    from tensorconv.cli.verify import run
    rows = run(["numpy"], ("float64",), 2, 7, ["cp", "tucker"], progress=False)
    print(repr([(r["derivation"], r["max_abs"], r["max_rel"], r["passed"]) for r in rows]))
    """
    outs = [_run_python(code, env={"PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    assert all(p.returncode == 0 for p in outs), [p.stderr[-2000:] for p in outs]
    assert outs[0].stdout == outs[1].stdout and outs[0].stdout.strip()


# -- 16. validation ----------------------------------------------------------------------------------------------------
def test_plan_conv_validates_shapes_and_dtypes():
    k = KruskalKernel.random((4, 3, 3, 3), 2, seed=0)
    with pytest.raises(TypeError, match=r"must hold ints, got 8.7"):
        plan_conv(k, (2, 3, 8.7, 8))
    with pytest.raises(ValueError, match="negative size -2"):
        plan_conv(k, (-2, 3, 8, 8))
    with pytest.raises(ValueError, match="dtype='float33' is not one of"):
        plan_conv(k, (2, 3, 8, 8), dtype="float33")
    assert plan_conv(k, (np.int64(2), 3, 8, 8)).input_shape == (2, 3, 8, 8)


@needs_torch
def test_layer_arguments_are_validated():
    from tensorconv.nn import KruskalConv, TuckerConv

    with pytest.raises(ValueError, match="groups must be an int >= 1, got 0"):
        TuckerKernel.random((4, 4, 3, 3), (2, 2), groups=0)
    with pytest.raises(ValueError, match="groups must be an int >= 1, got 0"):
        TuckerConv(4, 4, (3, 3), rank=2, groups=0)
    for bad in (float("inf"), float("nan"), -0.5):
        with pytest.raises(ValueError, match="finite and > 0"):
            KruskalConv(4, 4, (3, 3), rank=bad)
        with pytest.raises(ValueError, match="finite and > 0"):
            TuckerConv(4, 4, (3, 3), rank=bad)
    with pytest.raises(ValueError, match=r"kernel_size=\(\) has no spatial mode"):
        KruskalConv(4, 4, (), rank=2)


# -- 17. prune and the optimizer ---------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_prune_keeps_the_parameters_an_optimizer_holds(opt_name):
    import tensorconv.nn as tnn

    torch.manual_seed(0)
    model = torch.nn.Sequential(tnn.KruskalConv(3, 4, (3, 3), rank=6, padding=1, dtype=torch.float64))
    layer = model[0]
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adam": lambda p: torch.optim.Adam(p, lr=0.1)}
    opt = make[opt_name](model.parameters())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        layer.weights[[1, 4]] = 0.0
    before = [id(p) for p in layer.parameters()]
    assert tnn.prune(model, threshold=0.0, optimizer=opt) == {"0": (6, 4)}
    assert [id(p) for p in layer.parameters()] == before
    saved = [p.detach().clone() for p in layer.parameters()]
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(saved, layer.parameters()))  # the optimizer still trains them


@needs_torch
def test_prune_relative_cuts_each_layer_at_its_own_scale():
    import tensorconv.nn as tnn

    model = torch.nn.Sequential(tnn.KruskalConv(3, 4, (3, 3), rank=4), tnn.KruskalConv(4, 4, (3, 3), rank=4))
    with torch.no_grad():
        model[0].weights.copy_(torch.tensor([1e-3, 2e-3, 1e-5, 3e-3]))  # a layer of small lambdas
        model[1].weights.copy_(torch.tensor([1.0, 0.5, 1e-3, 2.0]))
    assert tnn.prune(model, relative=0.05) == {"0": (4, 3), "1": (4, 3)}
    with pytest.raises(ValueError, match="exactly one of threshold= and relative="):
        tnn.prune(model)
    with pytest.raises(ValueError, match="relative="):
        tnn.prune(model, relative=1.5)


# -- 18. autocast ------------------------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize(
    "strategy", ["auto", pytest.param("fused", marks=pytest.mark.slow), "factorized", "reconstructed"]
)  # fused: torch.compile
def test_autocast_computes_in_the_autocast_dtype_like_nn_conv(strategy):
    from tensorconv.nn import KruskalConv, TuckerConv

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 8, 8)
    for layer in (
        KruskalConv(8, 16, (3, 3, 3), rank=8, padding=1, strategy=strategy),
        TuckerConv(8, 16, (3, 3, 3), rank=(8, 8), padding=1, strategy=strategy),
    ):
        with torch.no_grad():
            want = layer(x)
            dense_layer = layer.to_dense_conv()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = layer(x)
                dense = dense_layer(x)
        assert got.dtype == dense.dtype == torch.bfloat16
        assert rel_err(got.float(), want) < 3e-2  # bfloat16 (8 bits of mantissa): stated 3e-2


# -- 8. torch.compile / torch.export see one op per layer, not the planner --------------------------------------
def _traceable_model():
    from tensorconv.nn import HOCPBlock, KruskalConv, TuckerConv

    torch.manual_seed(0)
    return torch.nn.Sequential(
        KruskalConv(4, 8, (3, 3, 3), rank=6, padding=1, stride=(1, 2, 1), dilation=(1, 1, 2)),
        torch.nn.ReLU(),
        TuckerConv(8, 8, (3, 3, 3), rank=(4, 4), padding=(1, (0, 2), 1), groups=2, padding_mode="reflect"),
        TuckerConv(8, 8, (1, 3, 3), rank=(4, 4), padding=(0, 1, 1), core_groups=2),
        HOCPBlock(8, 6, (1, 3, 3), rank=3, padding="same"),
        KruskalConv(6, 6, (3, 1, 3), rank=4, padding=((0, 2), 0, 1), padding_mode="circular"),
    ).double()


@needs_torch
@pytest.mark.slow
def test_compile_traces_one_graph_equal_to_eager():
    """fullgraph: dynamo records each CP layer as the opaque op tensorconv::cp_conv and the others as
    standard convs, never the Python planner behind conv() (tracing that took minutes per layer);
    aot_eager checks the graph without compiling C++."""
    model = _traceable_model()
    x = torch.randn(2, 4, 6, 10, 10, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    want = model(x)
    assert rel_err(got.detach(), want.detach()) < TOL
    grads = torch.autograd.grad(got.square().sum(), [x] + list(model.parameters()))
    want_grads = torch.autograd.grad(want.square().sum(), [x] + list(model.parameters()))
    # one scale for all: some gradients are zero up to rounding (a bias before a norm)
    assert rel_err(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in want_grads])) < TOL


@needs_torch
@pytest.mark.slow
def test_export_is_shape_generic_in_the_batch():
    model = _traceable_model().eval()
    x = torch.randn(2, 4, 6, 10, 10, dtype=torch.float64)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    for b in (1, 3):
        xb = torch.randn(b, 4, 6, 10, 10, dtype=torch.float64)
        with torch.no_grad():
            assert rel_err(exported.module()(xb), model(xb)) < TOL


# -- 13. peak_bytes counts what the chosen runner allocates --------------------------------------------------------
_PEAK_CODE = """
import gc, sys, torch
torch.set_num_threads(2)
from tensorconv import KruskalKernel, conv, plan_conv

def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

strategy, batch, c, r, dtype = {args!r}
k = KruskalKernel.random((c, c, 3, 3, 3), r, backend="torch", dtype=dtype, seed=0)
x = torch.randn((batch, c, 16, 32, 32), dtype=getattr(torch, dtype))
with torch.no_grad():
    conv(torch.randn((1, c, 4, 5, 6), dtype=x.dtype), k, padding=1, strategy=strategy)  # libraries loaded
    plan = plan_conv(k, x.shape, padding=1, strategy=strategy)
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts from here
    base, _ = rss()
    conv(x, k, padding=1, strategy=strategy)
    _, peak = rss()
print((peak - base) / plan.peak_bytes, plan.accelerator == "plane_chain")
"""


@needs_torch
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak RSS through Linux /proc")
@pytest.mark.parametrize(
    "args",
    [
        ("fused", 8, 64, 64, "float32"),
        ("fused", 1, 64, 64, "float32"),
        ("fused", 1, 32, 192, "float64"),
        ("factorized", 8, 64, 64, "float32"),
        ("factorized", 2, 64, 64, "float64"),
        ("factorized", 1, 64, 192, "float32"),
        ("reconstructed", 8, 64, 64, "float32"),
        ("reconstructed", 2, 32, 64, "float64"),
    ],
)
def test_peak_bytes_is_what_the_runner_allocates(args):
    """Measured peak RSS of one call over plan.peak_bytes, in a fresh process. The band allows for
    the allocator (freed blocks it keeps) and library scratch the estimate does not model."""
    from conftest import _loaded_kernel

    if args[0] == "fused":
        _loaded_kernel()
    proc = _run_python(_PEAK_CODE.format(args=args))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio, chain = proc.stdout.split()
    assert chain == str(args[0] == "fused")
    assert 0.6 < float(ratio) < 1.6, (args, ratio)


# -- 14. auto on r3d_18's layers ---------------------------------------------------------------------------------
@needs_torch
def test_auto_picks_the_measured_best_on_r3d18_layers():
    """The choices of `tensorconv bench r3d18` (batch 1, float32, parameter-matched CP rank), where
    the option auto picks ran within 1.03x of the fastest on the Intel Xeon VM (docs/benchmarks.md):
    the dense conv at the stem and through layer3.0, the plain factorized order from layer3 on."""
    from tensorconv.bench.common import R3D18_CONVS, params_matched_rank

    want = {
        "stem": "reconstructed",
        "layer1": "reconstructed",
        "layer2.0": "reconstructed",
        "layer2": "reconstructed",
        "layer3.0": "reconstructed",
        "layer3": "factorized",
        "layer4.0": "factorized",
        "layer4": "factorized",
    }
    for name, c, t, ks, stride, padding, spatial in R3D18_CONVS:
        k = KruskalKernel.random((t, c) + ks, params_matched_rank(c, t, ks), backend="torch", dtype="float32", seed=3)
        plan = plan_conv(k, (1, c) + spatial, stride=stride, padding=padding)
        assert plan.strategy == want[name], (name, plan.estimates)
        assert plan.order in (None, "fewest-macs"), (name, plan.order)


@needs_torch
def test_conv_under_autocast_is_one_behaviour():
    k = KruskalKernel.random((8, 4, 3, 3, 3), 4, backend="torch", dtype="float32", seed=0)
    x = torch.randn(1, 4, 6, 6, 6)
    want = conv(x, k, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kernel in (k, k.to_dense()):
            for strategy in ("auto", "fused", "factorized", "reconstructed"):
                got = conv(x, kernel, padding=1, strategy=strategy)
                assert got.dtype == torch.bfloat16, strategy
                assert rel_err(got.float(), want) < 3e-2  # bfloat16: stated 3e-2
        assert conv(x.double(), k.astype("float64"), padding=1).dtype == torch.float64  # autocast leaves float64
