"""conv / plan_conv against independent dense convolutions (torch F.convNd, numpy windows)."""

import contextlib
import os

import numpy as np
import pytest
from conftest import native_torch_convs, needs_torch, rel_err, run_python, to_backend, torch
from hypothesis import given
from hypothesis import strategies as st
from oracles import np_conv, reference_conv

from tensorconv import KruskalKernel, TuckerKernel, conv, plan_conv
from tensorconv.plans import CostModel

TOL = 1e-10
STRATEGIES = ["factorized", "reconstructed", "auto"]


@st.composite
def geometries(draw, max_n=4, min_n=1):
    n = draw(st.integers(min_n, max_n))
    max_d = {1: 9, 2: 7, 3: 5, 4: 4}[n]
    ks = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(n))
    kind = draw(st.sampled_from(["int", "pairs", "same", "valid"]))
    if kind == "same":
        stride = (1,) * n
        padding = "same"
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(ks, dil)]
    elif kind == "valid":
        padding, pads = "valid", [(0, 0)] * n
    elif kind == "int":
        p = draw(st.integers(0, 2))
        padding, pads = p, [(p, p)] * n
    else:
        pads = [(draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(n)]
        padding = tuple(pads)
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    spans = [d * (k - 1) + 1 for k, d in zip(ks, dil)]
    lo_d = [max(1, s - lo - hi, lo + 1, hi + 1) for s, (lo, hi) in zip(spans, pads)]
    dims = tuple(draw(st.integers(low, max(low, max_d))) for low in lo_d)
    return dict(ks=ks, stride=stride, dilation=dil, padding=padding, pads=pads, mode=mode, dims=dims)


def _kernel(kind, t, c, ks, rng_seed, data):
    if kind == "dense":
        return np.random.default_rng(rng_seed).standard_normal((t, c) + ks)
    if kind == "kruskal":
        rank = data.draw(st.integers(1, 5))
        modes = None
        if len(ks) >= 2 and data.draw(st.booleans()):
            modes = [(0,), (1,), tuple(range(2, 2 + len(ks)))]  # merged spatial factor
        return KruskalKernel.random((t, c) + ks, rank, modes=modes, seed=rng_seed)
    groups = data.draw(st.sampled_from([1, 2]))
    rank = (groups * data.draw(st.integers(1, 2)), groups * data.draw(st.integers(1, 2)))
    spatial = data.draw(st.sampled_from([None, 1, 2]))
    return TuckerKernel.random((t, c) + ks, rank, groups=groups, spatial_rank=spatial, seed=rng_seed)


def _to(kernel, backend):
    if isinstance(kernel, np.ndarray):
        return to_backend(kernel, backend)
    return kernel.to_backend(backend[0], device=backend[1])


@pytest.mark.parametrize("kind", ["kruskal", "tucker", "dense"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@given(geo=geometries(), data=st.data())
def test_conv_matches_dense_reference(backend, kind, strategy, geo, data):
    t, c, b = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 2))
    kernel = _kernel(kind, t, c, geo["ks"], data.draw(st.integers(0, 999)), data)
    x = np.random.default_rng(1).standard_normal((b, c) + geo["dims"])
    dense = kernel if kind == "dense" else kernel.to_dense()
    expected = reference_conv(
        x, dense, stride=geo["stride"], padding=geo["pads"], dilation=geo["dilation"], padding_mode=geo["mode"]
    )
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], padding_mode=geo["mode"])
    got = conv(to_backend(x, backend), _to(kernel, backend), strategy=strategy, **kw)
    assert rel_err(got, expected) < TOL
    if backend[0] == "torch":  # the native channels-last convs as well (float32's path)
        with native_torch_convs():
            assert rel_err(conv(to_backend(x, backend), _to(kernel, backend), strategy=strategy, **kw), expected) < TOL
    if kind != "dense":  # conv(x, kernel) == conv(x, kernel.to_dense())
        via_dense = conv(to_backend(x, backend), to_backend(dense, backend), **kw)
        assert rel_err(got, via_dense) < TOL


@given(data=st.data())
def test_grouped_dense_conv(backend, data):
    groups = data.draw(st.sampled_from([1, 2, 3]))
    n = data.draw(st.integers(1, 3))
    c, t = groups * data.draw(st.integers(1, 2)), groups * data.draw(st.integers(1, 2))
    w = np.random.default_rng(0).standard_normal((t, c // groups) + (3,) * n)
    x = np.random.default_rng(1).standard_normal((2, c) + (5,) * n)
    expected = reference_conv(x, w, padding=1, groups=groups)
    got = conv(to_backend(x, backend), to_backend(w, backend), padding=1, groups=groups)
    assert rel_err(got, expected) < TOL


def test_five_dimensional_conv_matches_numpy_windows():
    rng = np.random.default_rng(0)
    k = KruskalKernel.random((3, 2, 2, 3, 2, 2, 3), rank=3, seed=1)
    x = rng.standard_normal((1, 2, 3, 4, 3, 3, 4))
    expected = np_conv(x, k.to_dense(), stride=(1, 2, 1, 1, 1), padding=((1, 0), (1, 1), (0, 1), (0, 0), (1, 1)))
    for strategy in STRATEGIES:
        got = conv(x, k, stride=(1, 2, 1, 1, 1), padding=((1, 0), (1, 1), (0, 1), (0, 0), (1, 1)), strategy=strategy)
        assert rel_err(got, expected) < TOL


def test_unbatched_input(backend):
    k = KruskalKernel.random((4, 3, 3, 3), rank=2, seed=0).to_backend(backend[0], device=backend[1])
    x = np.random.default_rng(0).standard_normal((3, 6, 5))
    got = conv(to_backend(x, backend), k, padding=1)
    assert tuple(got.shape) == (4, 6, 5)
    assert rel_err(got, reference_conv(x[None], k.to_backend("numpy").to_dense(), padding=1)[0]) < TOL


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_cp_macs_equal_closed_form(n):
    c, t, r, ks = 16, 24, 8, (3,) * n
    dims = (8,) * n
    k = KruskalKernel.random((t, c) + ks, rank=r, seed=0)
    plan = plan_conv(k, (2, c) + dims, padding="same", strategy="factorized")
    voxels = 2 * 8**n
    assert plan.macs == voxels * r * (c + t + sum(ks))
    assert plan.dense_macs == voxels * t * c * 3**n
    text = plan.describe()
    for kind in ("pointwise", "depthwise"):
        assert kind in text
    assert f"{plan.macs:,}" in text


def test_plan_macs_equal_executed_work():
    """The plan's MAC count equals the multiply-adds its steps really perform (counted by hand)."""
    k = KruskalKernel.random((8, 6, 3, 2), rank=4, seed=0)
    plan = plan_conv(k, (2, 6, 9, 7), stride=(2, 1), padding=((1, 0), (0, 1)), strategy="factorized")
    total = 0
    for s in plan.steps:
        if s.kind == "weights":
            continue
        out_positions = int(np.prod(s.out_shape[: 1 + 2]))
        sizes = {"s": 6, "t": 8, "r": 4}
        channels = int(
            np.prod(
                [
                    sizes[i]
                    for i in dict.fromkeys(s.lhs_indices + tuple(i for i in s.rhs_indices if not i.startswith("k")))
                ]
            )
        )
        taps = int(np.prod([k.kernel_size[m] for m in s.modes]))
        total += out_positions * channels * taps
    assert plan.macs == total


def test_plan_is_reused_and_runs_on_several_backends():
    """One plan runs any kernel of its structure, on any backend; conv() reuses its own plan."""
    from tensorconv.plans.plan import _conv_plans

    k = KruskalKernel.random((4, 3, 3, 3), rank=2, seed=0)
    p1 = plan_conv(k, (2, 3, 6, 6), padding=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
    other = KruskalKernel.random((4, 3, 3, 3), rank=2, seed=5)
    assert rel_err(p1(x, other), conv(x, other, padding=1)) < 1e-12
    hits = _conv_plans.hits
    conv(x, k, padding=1)
    assert _conv_plans.hits == hits + 1  # the same structure and shape as `other`
    ref = p1(x, k)
    if torch is not None:
        got = p1(torch.from_numpy(x), k.to_backend("torch"))
        assert rel_err(got, ref) < 1e-12


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_auto_picks_reconstructed_atparams_matched_rank_and_factorized_at_r_eq_c(dtype):
    c = 64
    shape = (c, c, 3, 3, 3)
    matched = (c * c * 27) // (2 * c + 9 + 1)
    for backend_name in ("numpy", "torch"):
        big = plan_conv(
            KruskalKernel.random(shape, matched, seed=0),
            (1, c, 16, 32, 32),
            padding=1,
            backend=backend_name,
            dtype=dtype,
        )
        assert big.strategy == "reconstructed", big.estimates
        small = plan_conv(
            KruskalKernel.random(shape, c, seed=0), (1, c, 16, 32, 32), padding=1, backend=backend_name, dtype=dtype
        )
        # "fused" where the compiled plane-by-plane kernel is built on this machine (torch CPU)
        assert small.strategy in ("factorized", "fused"), small.estimates
        assert small.strategy == "factorized" or "fused (plane chain)" in small.estimates


# a cost model under which memory passes are all that count: the fastest factorized order
# merges spatial factors into one multi-mode depthwise step; rebuilding the dense kernel and
# convs that mix channels are priced out
_MERGING = CostModel(
    macs_per_s=1e15,
    bytes_per_s=1e6,
    call_overhead_s=0.0,
    dense_macs_per_s=1e-3,
    conv_macs_per_s=1e-3,
    native_steps=True,
    depthwise_macs_per_s=1e15,
)


@given(geo=geometries(), data=st.data())
def test_fastest_order_with_merged_depthwise_matches_reference(backend, geo, data):
    """auto's "fastest" order (one depthwise step over several modes) is still the same conv."""
    if len(geo["ks"]) < 2:
        geo = dict(
            geo,
            ks=geo["ks"] * 2,
            stride=geo["stride"] * 2,
            dilation=geo["dilation"] * 2,
            pads=geo["pads"] * 2,
            dims=geo["dims"] * 2,
            padding=geo["padding"] * 2 if isinstance(geo["padding"], tuple) else geo["padding"],
        )
    t, c = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    kernel = _kernel("kruskal", t, c, geo["ks"], data.draw(st.integers(0, 999)), data)
    x = np.random.default_rng(2).standard_normal((2, c) + geo["dims"])
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], padding_mode=geo["mode"])
    expected = reference_conv(
        x,
        kernel.to_dense(),
        stride=geo["stride"],
        padding=geo["pads"],
        dilation=geo["dilation"],
        padding_mode=geo["mode"],
    )
    # a model under which merging modes pays: the plan the caller holds takes that order (among
    # the library's own orders: no accelerator)
    plan = plan_conv(kernel, x.shape, backend=backend[0], device=backend[1], cost_model=_MERGING, accelerators=(), **kw)
    got = plan(to_backend(x, backend), _to(kernel, backend))
    with native_torch_convs():
        got_native = plan(to_backend(x, backend), _to(kernel, backend))
    assert plan.strategy == "factorized"
    assert rel_err(got, expected) < TOL
    assert rel_err(got_native, expected) < TOL
    if plan.order == "fastest":
        assert plan.macs >= plan.min_macs


@pytest.mark.parametrize("n", [2, 3])  # N > 3: a multi-mode step is a tap loop on torch (priced so)
def test_fastest_order_merges_modes_and_min_macs_keep_the_closed_form(n):
    c, t, r, ks = 6, 5, 4, (3,) * n
    k = KruskalKernel.random((t, c) + ks, rank=r, seed=0)
    plan = plan_conv(k, (2, c) + (6,) * n, padding="same", cost_model=_MERGING, accelerators=())
    voxels = 2 * 6**n
    assert plan.order == "fastest"
    assert [len(s.modes) for s in plan.steps if s.kind == "depthwise"] == [n]  # one step over every mode
    assert plan.macs == voxels * r * (c + t + 3**n)
    assert plan.min_macs == voxels * r * (c + t + sum(ks))  # the paper's count is still reported
    assert "fewest-MAC factorized order" in plan.describe()
    # the fewest-MAC order is what "factorized" runs, under any cost model
    fewest = plan_conv(k, (2, c) + (6,) * n, padding="same", strategy="factorized", cost_model=_MERGING)
    assert fewest.order == "fewest-macs" and fewest.macs == plan.min_macs
    x = np.random.default_rng(0).standard_normal((2, c) + (6,) * n)
    assert rel_err(plan(x, k), fewest(x, k)) < TOL


def test_numpy_auto_does_not_rebuild_the_kernel_at_r_eq_c_in_float64():
    """Regression: NumPy's dense conv is a loop of one GEMM per tap; priced as one pass in
    float32 rates, `auto` rebuilt the kernel here and ran 4x slower (41 vs 10 ms measured)."""
    k = KruskalKernel.random((16, 16, 3, 3, 3), rank=16, seed=0)
    plan = plan_conv(k, (2, 16, 16, 32, 32), padding=1)
    assert plan.itemsize == 8 and plan.strategy == "factorized", plan.estimates
    assert plan.estimates["reconstructed"] > 2 * plan.estimates["factorized"]


def test_order_objective_must_be_known():
    from tensorconv.plans.cost import cost_model_for
    from tensorconv.plans.planner import ConvPathOptimizer
    from tensorconv.plans.spec import make_geometry
    from tensorconv.plans.structure import structure_of

    k = KruskalKernel.random((4, 3, 3, 3), rank=2, seed=0)
    geometry = make_geometry((6, 6), (3, 3), stride=1, padding=1, dilation=1, padding_mode="zeros")
    with pytest.raises(ValueError, match="objective='flops' is not one of"):
        ConvPathOptimizer(structure_of(k), geometry, 2, 8, cost_model_for("numpy"), objective="flops")


def test_plans_are_held_by_their_caller_and_models_passed_not_set():
    """plan_conv returns a new plan per call (what one caller's plan caches, no other sees), a
    cost model is an argument, and conv()'s own cache is bounded and private."""
    from tensorconv.plans.plan import _conv_plans

    k = KruskalKernel.random((4, 3, 3, 3), rank=2, seed=0)
    first, second = plan_conv(k, (2, 3, 6, 6), padding=1), plan_conv(k, (2, 3, 6, 6), padding=1)
    assert first is not second and first.strategy == second.strategy
    first._whole["numpy"] = lambda x, kernel: "tampered"  # a caller changing its own plan...
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
    assert first(x, k) == "tampered"
    assert rel_err(second(x, k), conv(x, k, padding=1)) == 0.0  # ...changes nobody else's
    other = plan_conv(k, (2, 3, 6, 6), padding=1, cost_model=_MERGING)
    assert other.cost_model == _MERGING and plan_conv(k, (2, 3, 6, 6), padding=1).cost_model != _MERGING
    assert (_conv_plans.per_group, _conv_plans.total) == (256, 4096)
    with pytest.raises(TypeError, match="cost_model=.*not a CostModel"):
        plan_conv(k, (2, 3, 6, 6), cost_model={"macs_per_s": 1})


def test_errors_name_the_argument():
    k = KruskalKernel.random((4, 3, 3, 3), rank=2, seed=0)
    x = np.zeros((2, 3, 6, 6))
    with pytest.raises(ValueError, match="channel mismatch.*5 channels"):
        conv(np.zeros((2, 5, 6, 6)), k)
    with pytest.raises(ValueError, match="2 spatial dims"):
        conv(np.zeros((2, 3, 6, 6, 6)), k)
    with pytest.raises(ValueError, match="padded input has only 2"):
        conv(np.zeros((2, 3, 2, 6)), k)
    with pytest.raises(ValueError, match="stride"):
        conv(x, k, stride=0)
    with pytest.raises(ValueError, match="dilation"):
        conv(x, k, dilation=(1, 0))
    with pytest.raises(ValueError, match="padding='full'"):
        conv(x, k, padding="full")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        conv(x, k, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding_mode='mirror'"):
        conv(x, k, padding=1, padding_mode="mirror")
    with pytest.raises(ValueError, match="strategy='fast'"):
        conv(x, k, strategy="fast")
    with pytest.raises(ValueError, match="3 entries"):
        conv(x, k, padding=(1, 1, 1))
    with pytest.raises(TypeError, match="float32"):
        conv(x.astype(np.float32), k)
    with pytest.raises(ValueError, match="groups=2 applies to dense kernels only"):
        conv(x, k, groups=2)
    if torch is not None:
        with pytest.raises(TypeError, match="different libraries"):
            conv(torch.zeros(2, 3, 6, 6, dtype=torch.float64), k)


def _torch_available():
    return torch is not None


@pytest.mark.skipif(not _torch_available(), reason="torch is not installed")
@pytest.mark.parametrize("native", [False, True], ids=["tap-loops", "native-convs"])
@pytest.mark.parametrize("strategy", ["factorized", "reconstructed"])
@pytest.mark.parametrize("kind", ["kruskal", "merged", "tucker"])
def test_gradcheck_every_strategy(strategy, kind, native):
    if kind == "kruskal":
        k = KruskalKernel.random((3, 2, 3, 2), rank=2, backend="torch", seed=0)
        leaves = [k.weights] + list(k.factors)
    elif kind == "merged":
        k = KruskalKernel.random((3, 2, 3, 2), rank=2, modes=[(0,), (1,), (2, 3)], backend="torch", seed=0)
        leaves = [k.weights] + list(k.factors)
    else:
        k = TuckerKernel.random((4, 2, 3, 2), (2, 2), groups=2, backend="torch", seed=0)
        leaves = [k.core] + [f for f in k.factors if f is not None]
    for leaf in leaves:
        leaf.requires_grad_(True)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *arrays):
        if kind == "tucker":
            kk = TuckerKernel(arrays[0], list(arrays[1:]), groups=2)
        else:
            kk = KruskalKernel(arrays[0], list(arrays[1:]), k.modes)
        return conv(x, kk, stride=(2, 1), padding=((1, 0), 1), padding_mode="reflect", strategy=strategy)

    with native_torch_convs() if native else contextlib.nullcontext():
        assert torch.autograd.gradcheck(fn, (x, *leaves))


@pytest.mark.skipif(not _torch_available(), reason="torch is not installed")
def test_gradcheck_fastest_order_with_merged_depthwise():
    k = KruskalKernel.random((3, 2, 3, 2), rank=2, backend="torch", seed=0)
    leaves = [k.weights] + list(k.factors)
    for leaf in leaves:
        leaf.requires_grad_(True)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    plan = plan_conv(
        k, x.shape, stride=(2, 1), padding=((1, 0), 1), backend="torch", cost_model=_MERGING, accelerators=()
    )
    assert [len(s.modes) for s in plan.steps if s.kind == "depthwise"] == [2]
    with native_torch_convs():
        assert torch.autograd.gradcheck(
            lambda x, *arrays: plan(x, KruskalKernel(arrays[0], list(arrays[1:]))), (x, *leaves)
        )


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_torch_cpu_auto_runs_one_3x3x3_depthwise_conv_at_r_eq_c(monkeypatch):
    """Measured (`tensorconv bench depthwise`): oneDNN's channels-last 3x3x3 depthwise conv beats three
    1-D ones at 16-128 channels, so the default torch CPU model merges the spatial factors in
    float32. In float64 (no oneDNN kernels) the steps are tap loops, and nothing is merged.
    (Without the compiled plane chain, which auto prefers once it is built: tests/test_fused.py.)"""
    from tensorconv.accelerators.plane_chain import _build

    monkeypatch.setattr(_build, "_state", {"module": None})
    for c in (16, 64, 128):
        k = KruskalKernel.random((c, c, 3, 3, 3), rank=c, seed=0)
        plan = plan_conv(k, (1, c, 16, 32, 32), padding=1, backend="torch", dtype="float32")
        assert (plan.strategy, plan.order) == ("factorized", "fastest"), plan.estimates
        assert [s.modes for s in plan.steps if s.kind == "depthwise"] == [(0, 1, 2)]
        assert plan.min_macs == 16 * 32 * 32 * c * (2 * c + 9)
        in_float64 = plan_conv(k, (1, c, 16, 32, 32), padding=1, backend="torch", dtype="float64")
        assert (in_float64.strategy, in_float64.order) == ("factorized", "fewest-macs"), in_float64.estimates


@pytest.mark.slow
@pytest.mark.skipif(not _torch_available(), reason="torch is not installed")
def test_torch_compile_smoke():
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        pytest.skip("torch.compile is not available")
    k = KruskalKernel.random((4, 3, 3, 3), rank=2, backend="torch", dtype="float32", seed=0)
    x = torch.randn(1, 3, 6, 6)

    def fn(x):
        return conv(x, k, padding=1, strategy="factorized")

    try:
        compiled = compile_fn(fn, backend="eager")  # dynamo tracing only: no C++ toolchain needed
        got = compiled(x)
    except Exception as exc:  # pragma: no cover - environment without a working dynamo
        pytest.skip(f"torch.compile unavailable here: {exc}")
    assert rel_err(got, fn(x)) < 1e-6


def _same_plan(a, b):
    """Two plans made from the same arguments (plan_conv returns a new object each time)."""
    return (a.cost_model, a.itemsize, a.strategy, a.describe()) == (b.cost_model, b.itemsize, b.strategy, b.describe())


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_plan_conv_prices_with_the_kernels_own_backend_and_dtype():
    from tensorconv.plans.cost import cost_model_for

    k = KruskalKernel.random((16, 16, 3, 3, 3), rank=16, seed=0)
    shape = (2, 16, 8, 16, 16)
    on_torch = plan_conv(k.to_backend("torch", dtype="float32"), shape, padding=1)
    assert _same_plan(on_torch, plan_conv(k, shape, padding=1, backend="torch", dtype="float32"))
    assert on_torch.cost_model == cost_model_for("torch") and on_torch.itemsize == 4
    on_numpy = plan_conv(k, shape, padding=1)
    assert on_numpy.cost_model == cost_model_for("numpy") and on_numpy.itemsize == 8
    assert plan_conv((16, 16, 3, 3, 3), shape, padding=1).itemsize == 4  # a bare shape: float32, NumPy
    with pytest.raises(TypeError, match="different libraries"):
        plan_conv(KruskalKernel(k.weights, [torch.from_numpy(f) for f in k.factors]), shape)


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_device_selects_the_cost_model_however_it_is_named():
    from tensorconv.plans.cost import cost_model_for

    k = KruskalKernel.random((8, 8, 3, 3), rank=4, seed=0)
    by_name = plan_conv(k, (1, 8, 16, 16), padding=1, backend="torch", device="cuda")
    by_object = plan_conv(k, (1, 8, 16, 16), padding=1, backend="torch", device=torch.device("cuda", 0))
    assert _same_plan(by_name, by_object)
    assert by_name.cost_model == cost_model_for("torch", "cuda") != cost_model_for("torch", None)
    assert _same_plan(
        plan_conv(k, (1, 8, 16, 16), padding=1, backend="torch", device="cpu"),
        plan_conv(k, (1, 8, 16, 16), padding=1, backend="torch"),
    )


@pytest.mark.parametrize("strategy", ["auto", "factorized", "reconstructed", "fused"])
def test_torch_func_vmap_over_conv_equals_a_loop(strategy):
    torch = pytest.importorskip("torch")
    k = KruskalKernel.random((4, 3, 3, 3), 2, backend="torch", seed=0)
    xs = torch.randn(5, 2, 3, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = torch.func.vmap(lambda x: conv(x, k, padding=1, strategy=strategy))(xs)
    want = torch.stack([torch.nn.functional.conv2d(x, k.to_dense(), padding=1) for x in xs])
    assert rel_err(got, want) < 1e-10


def test_plan_cache_bounds_each_structure_and_the_total():
    """One structure fed endless shapes keeps only its most recent ones and cannot evict the
    plans of the others (a layer's plans survive a neighbour's variable-length inputs)."""
    from tensorconv.plans.cache import PlanCache

    made = []
    cache = PlanCache(lambda *rest: made.append(rest) or rest, per_group=3, total=5)
    cache.get("a", (1,))
    cache.get("b", (1,))
    for n in range(10):  # "a" fed ten shapes: it keeps its last three, "b" keeps its one
        cache.get("a", (n,))
    assert len(cache) == 4 and cache.get("b", (1,)) == (1,) and cache.hits == 2  # a: (1,) again; b: (1,)
    before = len(made)
    assert cache.get("a", (9,)) == (9,) and cache.get("a", (7,)) == (7,) and len(made) == before
    cache.get("a", (0,))  # evicted long ago: made again
    assert len(made) == before + 1
    for n in range(3):  # a third group: the total bound takes the least recently used group's oldest
        cache.get("c", (n,))
    assert len(cache) <= 5
    with pytest.raises(ValueError, match="per_group=4, total=2"):
        PlanCache(lambda: None, per_group=4, total=2)


def test_a_new_size_in_a_searched_bucket_prices_the_known_tree():
    """Shapes of one power-of-two size bucket share the order searched for the first: the plan
    for a new size costs one priced step per contraction instead of the search over subsets,
    and (the order being the same here) equals a fresh search's plan."""
    from tensorconv.plans import planner

    k = KruskalKernel.random((16, 12, 3, 3), rank=6, seed=1)
    # no accelerator: what auto weighs must not depend on whether the plane chain is built yet
    kw = dict(padding=1, backend="torch", dtype="float32", accelerators=())
    planner._TREES.clear()
    calls = []
    original = planner.ConvPathOptimizer._step

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    planner.ConvPathOptimizer._step = counting
    try:
        plan_conv(k, (4, 12, 40, 36), **kw)
        searched = len(calls)
        calls.clear()
        reused = plan_conv(k, (4, 12, 44, 33), **kw)
        priced = len(calls)
    finally:
        planner.ConvPathOptimizer._step = original
    # the factorized order's contractions (auto may still run the rebuilt dense kernel)
    n_steps = len(plan_conv(k, (4, 12, 44, 33), **dict(kw, strategy="factorized")).steps)
    assert 0 < priced <= 2 * n_steps < searched  # two objectives (auto), one step each
    planner._TREES.clear()
    fresh = plan_conv(k, (4, 12, 44, 33), **kw)
    assert [(s.kind, s.macs, s.out_shape) for s in reused.steps] == [(s.kind, s.macs, s.out_shape) for s in fresh.steps]
    assert reused.strategy == fresh.strategy and reused.estimates == fresh.estimates
    x = np.random.default_rng(1).standard_normal((4, 12, 44, 33))
    assert rel_err(reused(x, k), conv(x, k.to_dense(), padding=1)) < 1e-10


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
@pytest.mark.parametrize("padding", [0, 2, ((1, 2),)], ids=["valid", "symmetric", "asymmetric"])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_one_dimensional_native_steps_match_conv1d(monkeypatch, padding, stride, dilation, mode):
    """1-D plan steps run as 2-D convs of a (B, C, 1, L) channels-last view and 1x1 steps as
    GEMMs (conv1d would reorder a channels-last input); values and gradients against F.conv1d
    of the dense kernel, float64 through the float32 path (native convs forced)."""
    import torch.nn.functional as F

    from tensorconv.nn import KruskalConv, TuckerConv

    handed = []
    real = F.conv1d

    def spy(x, *args, **kw):
        handed.append(x.is_contiguous())
        return real(x, *args, **kw)

    monkeypatch.setattr(F, "conv1d", spy)
    for layer in (
        KruskalConv(5, 7, (3,), rank=4, strategy="factorized"),
        TuckerConv(6, 4, (5,), rank=(3, 2), strategy="factorized"),
    ):
        layer = layer.double()
        pads = ((padding, padding),) if isinstance(padding, int) else padding
        x = torch.randn(3, layer.in_channels, 23, dtype=torch.float64, requires_grad=True)
        padded = F.pad(x, pads[0], mode="constant" if mode == "zeros" else mode)
        expected = real(padded, layer.kernel.to_dense(), None, stride, 0, dilation)
        with native_torch_convs():
            got = conv(
                x,
                layer.kernel,
                stride=stride,
                dilation=dilation,
                padding=padding,
                padding_mode=mode,
                strategy="factorized",
            )
        assert rel_err(got.detach().numpy(), expected.detach().numpy()) < TOL
        g = torch.randn_like(expected)
        (grad_got,) = torch.autograd.grad(got, x, g)
        (grad_expected,) = torch.autograd.grad(expected, x, g)
        assert rel_err(grad_got.numpy(), grad_expected.numpy()) < TOL
    assert all(handed), "a plan step handed conv1d a channels-last view"


def _tap_loop_bytes(monkeypatch, limit):
    """TAP_LOOP_BYTES set to ``limit``, with a fresh plan cache (plans keep the runs they prepared)."""
    from tensorconv.backends import _torch_native
    from tensorconv.plans import plan as plan_module
    from tensorconv.plans.cache import PlanCache

    monkeypatch.setattr(_torch_native, "TAP_LOOP_BYTES", limit)
    monkeypatch.setattr(plan_module, "_conv_plans", PlanCache(plan_module.ConvPlan))


@pytest.fixture
def onednn_depthwise_steps(monkeypatch):
    """Small float32 1-D depthwise steps run as tap loops (TAP_LOOP_BYTES): this sends every one to oneDNN."""
    _tap_loop_bytes(monkeypatch, 0)


def _depthwise_conv2d_inputs(monkeypatch):
    """The input shapes handed to F.conv2d by depthwise steps, in order (a spy on F.conv2d)."""
    import torch.nn.functional as F

    seen, real = [], F.conv2d

    def spy(x, w, *args, **kw):
        if w.shape[1] == 1:
            seen.append(tuple(x.shape))
        return real(x, w, *args, **kw)

    monkeypatch.setattr(F, "conv2d", spy)
    return seen


def _one_d_kernels(seed):
    """A float32 CP kernel (6, 5, 3) of rank 4 and its float64 copy, factors requiring gradients."""
    k = KruskalKernel.random((6, 5, 3), 4, backend="torch", dtype="float32", seed=seed)
    k64 = k.astype("float64")
    for f in list(k.factors) + list(k64.factors):
        f.requires_grad_(True)
    return k, k64


def _assert_matches_conv1d(x, k, k64, pads, stride, dilation=1, **conv_kw):
    """conv(x, k) in float32 against F.conv1d of the dense float64 kernel: values and the
    gradients of the input and of every factor (rel 1e-5)."""
    import torch.nn.functional as F

    got = conv(x, k, stride=stride, dilation=dilation, strategy="factorized", **conv_kw)
    xd = x.detach().double().requires_grad_(True)
    want = F.conv1d(F.pad(xd, pads), k64.to_dense(), None, stride, 0, dilation)
    assert got.shape == want.shape
    assert rel_err(got.detach().double().numpy(), want.detach().numpy()) < 1e-5
    g = torch.randn(want.shape, dtype=torch.float64)
    grads_got = torch.autograd.grad(got, [x, *k.factors], g.float())
    grads_want = torch.autograd.grad(want, [xd, *k64.factors], g)
    for a, b in zip(grads_got, grads_want):
        assert rel_err(a.double().numpy(), b.numpy()) < 1e-5


@needs_torch
@pytest.mark.parametrize("padding", [1, ((0, 3),)], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("stride", [1, 2])
def test_small_float32_depthwise_1d_steps_run_as_tap_loops(monkeypatch, padding, stride):
    """A float32 1-D depthwise step on a CPU whose input holds at most TAP_LOOP_BYTES runs as the
    plans' tap loop (no oneDNN conv, nothing prepared per length); one byte over, as oneDNN's
    conv. Values and gradients against F.conv1d of the dense kernel in float64 (rel 1e-5)."""
    calls = _depthwise_conv2d_inputs(monkeypatch)
    k, k64 = _one_d_kernels(seed=3)
    pads = ((padding, padding),) if isinstance(padding, int) else padding
    b, n, rank = 2, 37, 4
    step_bytes = b * n * rank * 4  # the (B, L, R) input the depthwise step is handed (before padding)
    for limit, want_calls in ((step_bytes, 0), (step_bytes - 1, 1), (10**9, 0)):
        _tap_loop_bytes(monkeypatch, limit)
        calls.clear()
        x = torch.randn(b, 5, n, requires_grad=True)
        _assert_matches_conv1d(x, k, k64, pads[0], stride, padding=padding)
        assert len(calls) == want_calls, (limit, calls)


@needs_torch
@pytest.mark.parametrize("padding", [1, ((0, 3),), 0], ids=["symmetric", "asymmetric", "valid"])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2)])
def test_a_conv_fed_many_lengths_runs_few_onednn_shapes(onednn_depthwise_steps, monkeypatch, padding, stride, dilation):
    """Past EXACT_LENGTHS lengths, a 1-D step zero-extends its input to one of 8 lengths per
    octave (oneDNN prepares a primitive per shape, in one cache for the whole process): 60 lengths
    (about 1.3 octaves) reach conv2d as at most EXACT_LENGTHS + 12 shapes, and every output, and
    the gradients of the input and of the factors, match F.conv1d of the dense kernel (rebuilt by
    ``to_dense``, float64; the plans in float32, rel 1e-5)."""
    from tensorconv.backends._torch_native import EXACT_LENGTHS

    seen = _depthwise_conv2d_inputs(monkeypatch)
    k, k64 = _one_d_kernels(seed=7)
    pads = ((padding, padding),) if isinstance(padding, int) else padding
    lengths = range(40, 100)
    for n in lengths:
        x = torch.randn(2, 5, n, requires_grad=True)
        _assert_matches_conv1d(x, k, k64, pads[0], stride, dilation, padding=padding)
    shapes = set(seen)
    assert EXACT_LENGTHS < len(shapes) <= EXACT_LENGTHS + 12 < len(lengths), sorted(shapes)


@needs_torch
def test_reflect_padded_convs_fed_many_lengths_match_conv1d(onednn_depthwise_steps):
    """Bucketing extends the input after its reflect padding (which the step applies first): the
    outputs that read the extension are dropped, the others match F.conv1d with reflect padding."""
    import torch.nn.functional as F

    k = KruskalKernel.random((4, 3, 5), 3, backend="torch", dtype="float32", seed=8)
    for n in range(30, 60):
        x = torch.randn(1, 3, n)
        want = F.conv1d(F.pad(x.double(), (2, 2), mode="reflect"), k.to_dense().double())
        got = conv(x, k, padding=2, padding_mode="reflect", strategy="factorized")
        assert rel_err(got.double().numpy(), want.numpy()) < 1e-5, n


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
    proc = run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


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


def test_plan_conv_validates_shapes_and_dtypes():
    k = KruskalKernel.random((4, 3, 3, 3), 2, seed=0)
    with pytest.raises(TypeError, match=r"must hold ints, got 8.7"):
        plan_conv(k, (2, 3, 8.7, 8))
    with pytest.raises(ValueError, match="negative size -2"):
        plan_conv(k, (-2, 3, 8, 8))
    with pytest.raises(ValueError, match="dtype='float33' is not one of"):
        plan_conv(k, (2, 3, 8, 8), dtype="float33")
    assert plan_conv(k, (np.int64(2), 3, 8, 8)).input_shape == (2, 3, 8, 8)


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
    proc = run_python(_PEAK_CODE.format(args=args))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio, chain = proc.stdout.split()
    assert chain == str(args[0] == "fused")
    assert 0.6 < float(ratio) < 1.6, (args, ratio)


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


_FAULTS_CODE = """
import resource, torch
torch.set_num_threads(2)
from tensorconv import KruskalKernel, conv, plan_conv

strategy = {strategy!r}
k = KruskalKernel.random((64, 64, 3, 3, 3), 200, backend="torch", dtype="float32", seed=0)
x = torch.randn(({batch}, 64, 16, 56, 56))
with torch.no_grad():
    for _ in range(2):  # the first calls plan, load libraries and size what is reused
        y = conv(x, k, padding=1, strategy=strategy)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        y = conv(x, k, padding=1, strategy=strategy)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
pages = y.numel() * y.element_size() / resource.getpagesize()
print(faults / pages, plan_conv(k, x.shape, padding=1, strategy=strategy).accelerator)
"""


@needs_torch
@pytest.mark.parametrize("strategy", ["fused", "factorized"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_second_call_of_the_same_shape_takes_no_fresh_pages_beyond_its_output(strategy, batch, request):
    """In a plain process (glibc's default allocator, as users run): after the first calls, a
    factorized forward of the same shape page-faults in at most its output's pages, not its
    intermediates: fresh pages cost up to 2x. Counted as the process's minor page faults (a
    rank-200 CP conv of an r3d_18 layer1 input, whose four intermediates are 40 MB per image,
    above glibc's largest mmap threshold: allocated anew, they faulted in about 13x the
    output's pages per call). At batch 3 the output (38 MB) is above that threshold too: the
    caller lets each output go a call later, and the call writes into one it let go of."""
    if strategy == "fused":
        request.getfixturevalue("plane_kernel")
    done = run_python(_FAULTS_CODE.format(strategy=strategy, batch=batch))
    assert done.returncode == 0, done.stderr
    ratio, accelerator = done.stdout.split()
    assert accelerator == ("plane_chain" if strategy == "fused" else "None")
    bound = 1.5 if batch == 1 else 0.1
    assert float(ratio) <= bound, f"{float(ratio):.2f}x the output's pages faulted in per call"


@contextlib.contextmanager
def buffered_from(nbytes):
    """Plans made here write intermediates of ``nbytes`` and up into buffers (the default is
    glibc's 32 MiB, larger than these tests' shapes)."""
    from tensorconv.plans import workspace

    saved, workspace.MIN_BYTES = workspace.MIN_BYTES, nbytes
    try:
        yield
    finally:
        workspace.MIN_BYTES = saved


@needs_torch
@pytest.mark.parametrize("kind", ["kruskal", "tucker"])
@given(geo=geometries(), data=st.data())
def test_steps_written_into_reused_buffers_match_the_dense_conv(kind, geo, data):
    """Without a backward to feed, a factorized forward writes its intermediates into the thread's
    two buffers (GEMMs with ``out=``, oneDNN convs accumulating into a zeroed buffer): float32
    against the float64 NumPy oracle at rel 1e-5 (float32's stated tolerance), for every geometry,
    1-4-D, CP and Tucker; and to 1e-6 of the same plan run where a backward needs fresh tensors."""
    from tensorconv.plans.workspace import free_workspace, workspace_for

    t, c, b = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 2))
    kernel = _kernel(kind, t, c, geo["ks"], data.draw(st.integers(0, 999)), data)
    x = np.random.default_rng(1).standard_normal((b, c) + geo["dims"])
    geometry = dict(stride=geo["stride"], dilation=geo["dilation"], padding_mode=geo["mode"])
    expected = np_conv(x, kernel.to_dense(), padding=geo["pads"], **geometry)
    k32 = kernel.to_backend("torch").astype("float32")
    x32 = torch.from_numpy(x).float()
    with buffered_from(0):
        plan = plan_conv(k32, x32.shape, strategy="factorized", padding=geo["padding"], **geometry)
    assert not any(plan_conv(k32, x32.shape, strategy="factorized", padding=geo["padding"], **geometry)._buffers)
    free_workspace()
    with torch.no_grad():
        got = plan(x32, k32)
        again = plan(x32 * 2, k32)  # the second call writes over the first call's intermediates
    acts = sum(s.kind != "weights" for s in plan.steps)
    assert (workspace_for(k32.backend, x32).nbytes > 0) == (acts > 1 and plan.accelerator is None)
    assert rel_err(got.numpy(), expected) < 1e-5
    assert rel_err(again.numpy(), 2 * expected) < 1e-5
    x_grad = x32.clone().requires_grad_(True)
    fresh = plan(x_grad, k32)  # autograd on: no buffers
    assert rel_err(got.numpy(), fresh.detach().numpy()) < 1e-6


@needs_torch
def test_a_callers_output_is_never_a_buffer_a_later_call_writes():
    """Outputs the caller keeps (in a list here) are never written by later calls, whose last
    steps would write into kept buffers where nothing refers to them: each stays as it was."""
    from tensorconv.nn import KruskalConv, TuckerConv
    from tensorconv.plans.workspace import free_workspace

    for layer in (
        KruskalConv(6, 5, (3, 3, 3), rank=7, padding=1, bias=False, strategy="factorized"),
        TuckerConv(6, 5, (3, 3), rank=(4, 3), padding="same", bias=False, strategy="factorized"),
    ):
        shape = (2, 6) + (9,) * layer.n_spatial
        xs = [torch.randn(shape) for _ in range(3)]
        free_workspace()
        with torch.no_grad(), buffered_from(0):
            outs = [layer(x) for x in xs]
        assert free_workspace() > 0, "the layer's plan wrote nothing into buffers"
        with torch.no_grad():
            dense = layer.kernel.to_dense()
            for x, y in zip(xs, outs):
                want = (torch.nn.functional.conv2d, torch.nn.functional.conv3d)[layer.n_spatial - 2](
                    x.double(), dense.double(), padding=1
                )
                assert rel_err(y.double().numpy(), want.numpy()) < 1e-5


def _storage_ptr(y):
    return y.untyped_storage().data_ptr()


@needs_torch
@pytest.mark.parametrize("strategy", ["fused", "factorized"])
def test_an_output_let_go_is_written_again_and_one_still_referred_to_never(strategy, request):
    """Large outputs come from buffers kept per thread (Workspace.output): once nothing refers
    to an output, a later call of its size writes into it (no fresh pages); while anything does
    (the tensor, a view, a detached alias, a NumPy array or the storage object of it), no call
    writes it: six calls later it still holds its values. Against F.conv3d, float32 at 1e-5."""
    from tensorconv.plans.workspace import KEPT_OUTPUTS, free_workspace

    if strategy == "fused":
        request.getfixturevalue("plane_kernel")
    k = KruskalKernel.random((6, 5, 3, 3, 3), 7, backend="torch", dtype="float32", seed=3)
    xs = [torch.randn(2, 5, 6, 7, 8) for _ in range(4)]
    wants = [torch.nn.functional.conv3d(x.double(), k.to_dense().double(), padding=1).numpy() for x in xs]
    holders = {
        "the tensor": lambda y: y,
        "a view": lambda y: y[:, 1:3],
        "a detached alias": lambda y: y.detach(),
        "a NumPy array": lambda y: y.numpy(),
        "its storage": lambda y: y.untyped_storage(),
    }
    free_workspace()
    with torch.no_grad(), buffered_from(0):
        plan = plan_conv(k, xs[0].shape, padding=1, strategy=strategy)
        assert (plan.accelerator == "plane_chain") == (strategy == "fused")
        y = plan(xs[0], k)
        ptr = _storage_ptr(y)
        del y
        y = plan(xs[1], k)
        assert _storage_ptr(y) == ptr, "an output nothing refers to was not written again"
        assert rel_err(y.double().numpy(), wants[1]) < 1e-5
        for name, hold in holders.items():
            y = plan(xs[2], k)
            snapshot, ptr = y.clone(), _storage_ptr(y)
            held = hold(y)
            del y
            for i in range(2 * KEPT_OUTPUTS + 2):
                other = plan(xs[i % 2], k)
                assert _storage_ptr(other) != ptr, name
                assert rel_err(other.double().numpy(), wants[i % 2]) < 1e-5
                del other
            if name == "its storage":
                held = torch.empty(0).set_(held, snapshot.storage_offset(), snapshot.shape, snapshot.stride())
                snapshot_held = snapshot
            else:
                snapshot_held = hold(snapshot)
            assert np.array_equal(np.asarray(held), np.asarray(snapshot_held)), f"{name}: written by a later call"
            del held
    assert rel_err(snapshot.double().numpy(), wants[2]) < 1e-5


@needs_torch
def test_buffers_are_per_thread():
    """Two threads running one plan at once, each on its own inputs, get their own results: the
    buffers are per thread (a shared pair would mix the threads' intermediates)."""
    import threading

    k = KruskalKernel.random((8, 8, 3, 3), 12, backend="torch", dtype="float32", seed=0)
    xs = [torch.randn(2, 8, 40, 40) for _ in range(2)]
    wants = [torch.nn.functional.conv2d(x.double(), k.to_dense().double(), padding=1) for x in xs]
    with buffered_from(0):
        plan = plan_conv(k, xs[0].shape, padding=1, strategy="factorized")
    start, errors = threading.Barrier(2), [[], []]

    def work(i):
        start.wait()
        with torch.no_grad():
            for _ in range(30):
                errors[i].append(rel_err(plan(xs[i], k).double().numpy(), wants[i].numpy()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(errors[0]) == len(errors[1]) == 30
    assert max(errors[0] + errors[1]) < 1e-5


@needs_torch
def test_buffers_serve_inference_mode_no_grad_and_autograd_alike():
    """Buffers made inside torch.inference_mode are normal tensors (an inference tensor could not
    be written outside it); a call that feeds a backward allocates fresh tensors and its gradients
    are right; free_workspace frees what the thread holds."""
    from tensorconv.plans.workspace import free_workspace

    k = KruskalKernel.random((5, 4, 3, 3, 3), 6, backend="torch", dtype="float32", seed=1)
    x = torch.randn(1, 4, 8, 8, 8)
    want = torch.nn.functional.conv3d(x.double(), k.to_dense().double(), padding=1)
    with buffered_from(0):
        plan = plan_conv(k, x.shape, padding=1, strategy="factorized")
    free_workspace()
    for context in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with context():
            assert rel_err(plan(x, k).double().numpy(), want.numpy()) < 1e-5
    assert free_workspace() > 0
    x_grad = x.clone().requires_grad_(True)
    y = plan(x_grad, k)
    assert free_workspace() == 0  # autograd on: nothing was written into buffers
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x_grad, g)
    xd = x.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.nn.functional.conv3d(xd, k.to_dense().double(), padding=1), xd, g.double())
    assert rel_err(got.double().numpy(), expected.numpy()) < 1e-5


@needs_torch
def test_buffers_without_onednn_fall_back_to_new_tensors(monkeypatch):
    """With oneDNN switched off (torch.backends.mkldnn.flags) no step calls oneDNN's conv into a
    buffer: they run as torch's other conv kernels into new tensors, with the same results."""
    from tensorconv.backends import _torch_native

    calls = []
    real = _torch_native._ADD_INTO
    monkeypatch.setattr(_torch_native, "_ADD_INTO", lambda *a: calls.append(1) or real(*a))
    k = KruskalKernel.random((6, 5, 3, 3), 7, backend="torch", dtype="float32", seed=2)
    x = torch.randn(2, 5, 11, 13)
    geometry = dict(stride=(1, 2), padding=(1, 2), dilation=(1, 2))
    want = torch.nn.functional.conv2d(x.double(), k.to_dense().double(), **geometry)
    with buffered_from(0):
        plan = plan_conv(k, x.shape, strategy="factorized", **geometry)
    for enabled in (False, True):
        calls.clear()
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=enabled):
            got = plan(x, k)
        assert rel_err(got.double().numpy(), want.numpy()) < 1e-5
        assert bool(calls) == enabled


@needs_torch
def test_torch_func_transforms_never_write_into_buffers():
    """vmap has no batching rule for ops with ``out=`` and torch.func.grad needs the autograd ops:
    under a torch.func transform the steps allocate as before (float32 vs the dense conv, 1e-5)."""
    from torch.func import grad, vmap

    k = KruskalKernel.random((5, 4, 3, 3), 6, backend="torch", dtype="float32", seed=1)
    dense = k.to_dense().double()
    xs = torch.randn(3, 2, 4, 9, 9)
    with buffered_from(0):
        plan = plan_conv(k, xs.shape[1:], padding=1, strategy="factorized")
    want = torch.stack([torch.nn.functional.conv2d(x.double(), dense, padding=1) for x in xs])
    for context in (contextlib.nullcontext, torch.no_grad):
        with context():
            got = vmap(lambda x: plan(x, k))(xs)
        assert rel_err(got.double().numpy(), want.numpy()) < 1e-5
    got = grad(lambda x: plan(x, k).square().sum())(xs[0])
    xd = xs[0].double().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.nn.functional.conv2d(xd, dense, padding=1).square().sum(), xd)
    assert rel_err(got.double().numpy(), expected.numpy()) < 1e-5
