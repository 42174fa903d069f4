"""Compile and export models with factorized layers, N = 1..3: torch.compile(fullgraph=True),
torch.export and torch.onnx.export (run by onnxruntime), each against the eager model.

Under torch.compile / torch.export a CP layer on a device that an accelerator serves (CPU here)
records its plan as one custom op (tensorconv::cp_conv); everything else, and every layer under
ONNX export, records standard convs (a CP layer: 1x1 -> one depthwise conv per mode -> 1x1;
Tucker: 1x1 -> core conv -> 1x1), so the ONNX graphs hold standard ops only.
onnx, onnxruntime and onnxscript are test extras: CI runs the ONNX test (no skip there).
"""

import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import needs_torch, rel_err  # noqa: E402

from tensorconv import KruskalKernel, conv  # noqa: E402
from tensorconv.nn import HOCPBlock, KruskalConv, TuckerConv  # noqa: E402

TOL = 1e-10
pytestmark = pytest.mark.slow  # compiles, exports and opchecks (seconds each); CI runs them

STANDARD_ONNX_OPS = {
    "Conv",
    "Pad",
    "Add",
    "Relu",
    "MatMul",
    "Mul",
    "Reshape",
    "Transpose",
    "Identity",
    "Constant",
    "Shape",
    "Slice",
    "Concat",
    "Squeeze",
    "Unsqueeze",
    "Cast",
    "Gather",
    "BatchNormalization",
}  # HOCPBlock's Psi


def _model(n, dtype=torch.float64):
    """Kruskal and Tucker layers with stride, dilation, asymmetric padding and every padding mode."""
    torch.manual_seed(n)
    k = (3,) * n
    asym = ((1, 2),) + ((1, 0),) * (n - 1)
    return torch.nn.Sequential(
        KruskalConv(3, 8, k, rank=5, stride=(2,) + (1,) * (n - 1), padding=asym),
        torch.nn.ReLU(),
        TuckerConv(8, 8, k, rank=(4, 4), padding="same", padding_mode="reflect", groups=2),
        KruskalConv(
            8, 6, k, rank=4, dilation=(1,) * (n - 1) + (2,), padding=(1,) * (n - 1) + (2,), padding_mode="circular"
        ),
        TuckerConv(6, 6, k, rank=(3, 3), padding=1, padding_mode="replicate", core_groups=3),
        HOCPBlock(6, 4, k, rank=3, padding="same"),
    ).to(dtype)


def _input(n, batch=2, dtype=torch.float64):
    return torch.randn((batch, 3) + (9,) * n, dtype=dtype)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_compile_fullgraph_forward_and_backward_equal_eager(n):
    model = _model(n)
    x = _input(n).requires_grad_(True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), model(x)
    assert rel_err(got.detach(), want.detach()) < 1e-10
    params = [x] + [p for p in model.parameters()]
    g1 = torch.autograd.grad(got.square().sum(), params)
    g2 = torch.autograd.grad(want.square().sum(), params)
    assert rel_err(torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g2])) < 1e-10


@pytest.mark.parametrize("n", [1, 2, 3])
def test_torch_export_equals_eager_for_any_batch(n):
    model = _model(n).eval()
    exported = torch.export.export(model, (_input(n),), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    for b in (1, 4):
        x = _input(n, b)
        with torch.no_grad():
            assert rel_err(exported.module()(x), model(x)) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3])
def test_onnx_export_runs_in_onnxruntime_with_standard_ops(n, tmp_path):
    if not os.environ.get("CI"):
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (a test extra)")
        pytest.importorskip("onnxscript", reason="onnxscript is not installed (a test extra)")
    import onnx
    import onnxruntime as ort

    model = _model(n, torch.float32).eval()
    path = tmp_path / "model.onnx"
    program = torch.onnx.export(
        model,
        (_input(n, dtype=torch.float32),),
        dynamo=True,
        verbose=False,
        dynamic_shapes=({0: torch.export.Dim("batch", max=64)},),
    )
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "a custom op reached the graph"
    assert "Conv" in ops and ops <= STANDARD_ONNX_OPS, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = _input(n, b, torch.float32)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())  # float32: stated 1e-4


# -- the plane chain as one opaque op: torch.library custom op with a fake kernel and autograd --------------------
def _chain_model(n, dtype=torch.float64):
    """CP layers the plane chain takes (stride 1 with gradients; strided without), every padding mode."""
    torch.manual_seed(10 + n)
    k = (3,) * n
    asym = ((1, 2),) + ((1, 0),) * (n - 1)
    return torch.nn.Sequential(
        KruskalConv(3, 8, k, rank=6, padding=asym),
        torch.nn.ReLU(),
        KruskalConv(8, 8, k, rank=5, padding="same", padding_mode="reflect", strategy="fused"),
        KruskalConv(
            8, 6, k, rank=4, dilation=(2,) + (1,) * (n - 1), padding=(2,) + (1,) * (n - 1), padding_mode="circular"
        ),
    ).to(dtype)


def _capturing(targets):
    """A torch.compile backend that records the graph's ops, then compiles it with aot_eager
    (AOT autograd: fake kernels for the forward, the registered backward)."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return lookup_backend("aot_eager")(gm, example_inputs)

    return backend


def _dense_oracle(model, x, n):
    """Standard convs (F.pad + F.convNd) on the rebuilt dense kernels, layer by layer."""
    from oracles import torch_conv

    from tensorconv.plans.spec import normalize_padding

    with torch.no_grad():
        out = x.detach()
        for layer in model:
            if isinstance(layer, KruskalConv):
                pads = normalize_padding(layer.padding, layer.kernel_size, layer.stride, layer.dilation)
                w = layer.kernel.to_dense().numpy()
                y = torch_conv(out.numpy(), w, layer.stride, pads, layer.dilation, 1, layer.padding_mode)
                out = torch.from_numpy(y) + layer.bias.reshape((-1,) + (1,) * n)
            else:
                out = layer(out)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_compile_records_each_cp_layer_as_one_op_that_runs_the_plane_chain(n, chain_calls):
    model = _chain_model(n)
    x = _input(n).requires_grad_(True)
    targets = []
    compiled = torch.compile(model, fullgraph=True, backend=_capturing(targets))
    got = compiled(x)
    ran = len(chain_calls)
    want = model(x)
    # one opaque op per CP layer, nothing traced into it; the plan inside runs the chain
    assert sum(t.startswith("tensorconv.cp_conv") for t in targets) == 3, targets
    assert not any("cp_chain" in t or "conv3d" in t or "conv2d" in t or "conv1d" in t for t in targets), targets
    assert ran >= 3, "the compiled model did not run the plane chain"
    assert rel_err(got.detach(), want.detach()) < 1e-10
    params = [x] + list(model.parameters())
    g1 = torch.autograd.grad(got.square().sum(), params)
    g2 = torch.autograd.grad(want.square().sum(), params)
    assert rel_err(torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g2])) < 1e-10
    assert rel_err(got.detach(), _dense_oracle(model, x, n)) < 1e-10


@pytest.mark.parametrize("n", [1, 3])
def test_export_records_the_cp_op_for_any_batch(n, chain_calls):
    model = _chain_model(n).eval()
    exported = torch.export.export(model, (_input(n),), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    ops = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert sum(t.startswith("tensorconv.cp_conv") for t in ops) == 3, ops
    for b in (1, 4):
        x = _input(n, b)
        before = len(chain_calls)
        with torch.no_grad():
            got = exported.module()(x)
        assert len(chain_calls) > before
        assert rel_err(got, model(x)) < 1e-10
        assert rel_err(got, _dense_oracle(model, x, n)) < 1e-10


def test_the_custom_ops_pass_torch_library_opcheck(chain_calls):
    """torch.library.opcheck on the four ops: schema, fake kernel vs the real one (shapes,
    strides), autograd registration, and AOT dispatch with static and dynamic shapes."""
    import tensorconv.accelerators.plane_chain._ops  # noqa: F401  (registers the ops)
    import tensorconv.nn._ops  # noqa: F401

    g = torch.Generator().manual_seed(0)
    c, r, t = 3, 4, 5
    x = torch.randn(2, c, 5, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    lam, u_t, u_c = (
        torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True) for s in ((r,), (t, r), (c, r))
    )
    spatial = [torch.randn(3, r, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
    geo = ([5, 6, 4], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    torch.library.opcheck(torch.ops.tensorconv.cp_chain.default, (x, lam, u_t, u_c, *spatial, *geo))
    strided = ([3, 6, 2], [2, 1, 2], [1, 1, 1], [1, 1, 1])
    with torch.no_grad():
        plain = [v.detach() for v in (x, lam, u_t, u_c, *spatial)]
        torch.library.opcheck(torch.ops.tensorconv.cp_chain.default, (*plain, *strided))
    grad = torch.randn(2, 5, 6, 4, t, dtype=torch.float64, generator=g)
    wt = (u_t * lam).t().contiguous().detach()
    for need_gx in (True, False):
        torch.library.opcheck(
            torch.ops.tensorconv.cp_chain_backward.default,
            (plain[0], plain[3], *plain[4:], wt, grad, [1, 1, 1], [1, 1, 1], need_gx),
        )
    for stride, padding, mode, with_u_c in (
        ([1, 1, 1], [1, 1, 1, 1, 1, 1], "zeros", True),
        ([2, 1, 2], [1, 2, 0, 1, 1, 0], "reflect", True),
        ([1, 1, 1], [1, 1, 1, 1, 1, 1], "zeros", False),
    ):
        inp = x if with_u_c else torch.randn(2, r, 5, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
        args = (inp, lam, u_t, u_c if with_u_c else None, spatial, stride, padding, [1, 1, 1], mode, "auto")
        torch.library.opcheck(torch.ops.tensorconv.cp_conv.default, args)
        out = torch.ops.tensorconv.cp_conv(*args)
        # the backward op has no derivative of its own (higher-order gradients are eager only)
        plain_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        plain_args[4] = [u.detach() for u in spatial]
        torch.library.opcheck(
            torch.ops.tensorconv.cp_conv_backward.default, (torch.randn_like(out).detach(), *plain_args)
        )


def test_compile_with_symbolic_sizes_runs_the_plan_of_each_shape(chain_calls):
    """dynamic=True (as dynamo's automatic dynamic shapes after a recompile): the op is planned
    when it runs, so sizes the trace never saw get their own plan; equal to eager."""
    model = _chain_model(2)
    targets = []
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=_capturing(targets))
    for shape in ((2, 3, 9, 9), (3, 3, 7, 11)):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        got, want = compiled(x), model(x)
        assert rel_err(got.detach(), want.detach()) < 1e-10
        (g1,) = torch.autograd.grad(got.square().sum(), x)
        (g2,) = torch.autograd.grad(want.square().sum(), x)
        assert rel_err(g1, g2) < 1e-10
    ops = sum(t.startswith("tensorconv.cp_conv") for t in targets)
    assert ops and ops % 3 == 0, targets  # three per graph (a size guard may add a graph)


def _block(n, dtype=torch.float64):
    """A factorized real block: CP conv (strided) -> BN -> ReLU -> CP conv -> Tucker conv (strided)."""
    torch.manual_seed(10 + n)
    k = (3,) * n
    bn = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)[n - 1]
    return torch.nn.Sequential(
        KruskalConv(3, 8, k, 2, 1, rank=6),
        bn(8),
        torch.nn.ReLU(),
        KruskalConv(8, 8, k, 1, 1, rank=5),
        torch.nn.ReLU(),
        TuckerConv(8, 4, k, 2, 1, rank=(3, 4)),
    ).to(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3])
def test_compiled_training_with_the_default_backend_equals_eager(n):
    """What users run: torch.compile's default backend (inductor), forward, backward and one
    optimizer step on a stacked block, against the same steps eagerly (float64, rel 1e-9: inductor
    may reorder the batch-norm reductions)."""
    import copy

    # a fresh dynamo: recompiling the same layers at another N would mark sizes dynamic, and
    # inductor fails to lower strided 3-D convs with symbolic sizes (dense nn.Conv3d too)
    torch._dynamo.reset()
    eager = _block(n)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, compiled_model)]
    g = torch.Generator().manual_seed(n)
    for _ in range(2):
        x = torch.randn((2, 3) + (9,) * n, dtype=torch.float64, generator=g)
        losses = []
        for model, run, opt in ((eager, eager, opts[0]), (compiled_model, compiled, opts[1])):
            opt.zero_grad()
            loss = run(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert rel_err(losses[1], losses[0]) < 1e-9
    for p, q in zip(eager.parameters(), compiled_model.parameters()):
        assert rel_err(q.detach(), p.detach()) < 1e-9


def test_cp_conv_ops_pass_opcheck_with_channels_last_inputs():
    """The layout one CP layer hands the next (channels-last strides): the fake kernels must
    promise the strides the real ops return, for the forward and the backward op."""
    import tensorconv.nn._ops  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(1)
    c, r, t = 4, 5, 6
    for n in (1, 2, 3):
        x = torch.randn((2, c) + (6,) * n, dtype=torch.float64, generator=g)
        for layout in ("contiguous", "channels-last"):
            inp = x if layout == "contiguous" else x.movedim(1, -1).contiguous().movedim(-1, 1)
            params = [torch.randn(s, dtype=torch.float64, generator=g) for s in ((r,), (t, r), (c, r))]
            spatial = [torch.randn(3, r, dtype=torch.float64, generator=g) for _ in range(n)]
            geo = ([1] * n, [1, 1] * n, [1] * n, "zeros", "auto")
            args = (inp.requires_grad_(True), *[p.requires_grad_(True) for p in params], spatial, *geo)
            torch.library.opcheck(torch.ops.tensorconv.cp_conv.default, args)
            out = torch.ops.tensorconv.cp_conv(*args)
            plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            for grad in (torch.randn_like(out), torch.randn(out.shape, dtype=out.dtype)):
                torch.library.opcheck(torch.ops.tensorconv.cp_conv_backward.default, (grad, *plain))


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
    with torch.no_grad(), warnings.catch_warnings():
        # the layers read no parameter's size under the trace: it holds for other shapes and says so
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.randn(2, 4, 6, 10, 10))
        for shape in [(1, 4, 5, 7, 9), (3, 4, 8, 6, 11)]:
            x = torch.randn(shape)
            got, want = traced(x), model(x)
            assert got.shape == want.shape and rel_err(got, want) < 1e-5  # float32: stated 1e-5


@pytest.fixture
def without_plane_chain():
    """The plane chain out of the registry for one test: it runs these small 7x7 layers fastest
    at every shape (where built), and the tests below need a layer that ``auto`` rebuilds at one
    shape and runs as factors at another."""
    from tensorconv import accelerators

    chain = accelerators.unregister("plane_chain")
    try:
        yield
    finally:
        accelerators.register(chain)


@needs_torch
def test_a_trace_records_the_rebuilt_kernel_where_the_plan_for_its_shape_rebuilds_it(without_plane_chain):
    """A traced (ONNX-exported) graph holds the form the eager plan runs at the traced shape: the
    rebuilt dense kernel as one conv where ``auto`` rebuilds a CP kernel (ONNX Runtime ran
    r3d_18's stem as five convs at twice the dense conv's time), the factors' chain where it runs
    them; ``strategy="reconstructed"`` / ``"factorized"`` as asked. Either graph holds at other
    shapes."""
    from tensorconv import plan_conv
    from tensorconv.nn import KruskalConv

    def convs(traced):
        return sum(1 for node in traced.inlined_graph.nodes() if node.kind() == "aten::_convolution")

    torch.manual_seed(0)
    shapes = [(1, 8, 32, 32), (8, 8, 32, 32)]
    for strategy in ("auto", "reconstructed", "factorized"):
        layer = KruskalConv(8, 16, (7, 7), rank=20, padding=3, strategy=strategy).eval()
        for shape in shapes:
            planned = plan_conv(layer.kernel, shape, padding=3, backend="torch", dtype="float32").strategy
            rebuilt = strategy == "reconstructed" or (strategy == "auto" and planned == "reconstructed")
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("error", torch.jit.TracerWarning)  # planning records nothing
                traced = torch.jit.trace(layer, torch.randn(shape))
                assert convs(traced) == (1 if rebuilt else 4), (strategy, shape, planned)
                for other in shapes:
                    x = torch.randn(other)
                    assert rel_err(traced(x), layer(x)) < 1e-5  # float32: stated 1e-5
    auto = KruskalConv(8, 16, (7, 7), rank=20, padding=3).kernel
    # both forms are exercised: the default cost model rebuilds at one shape and not the other
    assert [plan_conv(auto, s, padding=3, backend="torch", dtype="float32").strategy for s in shapes] == [
        "reconstructed",
        "factorized",
    ]


@needs_torch
def test_a_trace_where_the_plan_runs_an_accelerator_records_what_the_plan_without_it_runs(plane_kernel):
    """Where ``auto`` runs the plane chain at the traced shape, which no traced graph can hold,
    the graph holds the form the plan without accelerators runs: here the rebuilt kernel at
    batch 1, the factors at batch 8 (r3d_18's stem, which auto runs as the chain, had gone into
    ONNX graphs as the factors' five convs, slower in ONNX Runtime than one rebuilt conv)."""
    from tensorconv import plan_conv
    from tensorconv.nn import KruskalConv

    torch.manual_seed(0)
    layer = KruskalConv(8, 16, (7, 7), rank=20, padding=3).eval()
    for shape, want in (((1, 8, 32, 32), 1), ((8, 8, 32, 32), 4)):
        assert plan_conv(layer.kernel, shape, padding=3).accelerator == "plane_chain"
        unfused = plan_conv(layer.kernel, shape, padding=3, accelerators=()).strategy
        assert unfused == ("reconstructed" if want == 1 else "factorized")
        with torch.no_grad():
            traced = torch.jit.trace(layer, torch.randn(shape))
            convs = sum(1 for node in traced.inlined_graph.nodes() if node.kind() == "aten::_convolution")
            assert convs == want, (shape, convs)
            x = torch.randn(shape)
            assert rel_err(traced(x), layer(x)) < 1e-5  # float32: stated 1e-5


@pytest.mark.slow
def test_onnx_export_of_a_layer_its_plan_rebuilds_is_one_conv_in_onnxruntime(tmp_path, without_plane_chain):
    if not os.environ.get("CI"):
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (a test extra)")
        pytest.importorskip("onnxscript", reason="onnxscript is not installed (a test extra)")
    import onnx
    import onnxruntime as ort

    from tensorconv.nn import KruskalConv

    torch.manual_seed(0)
    model = torch.nn.Sequential(KruskalConv(8, 16, (7, 7), rank=20, padding=3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 8, 32, 32)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(str(path))
    convs = [node for node in onnx.load(str(path)).graph.node if node.op_type == "Conv"]
    assert len(convs) == 1, [node.op_type for node in onnx.load(str(path)).graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())  # float32: stated 1e-4


@needs_torch
def test_jit_script_says_why():
    from tensorconv.nn import KruskalConv

    with pytest.raises(RuntimeError, match="torch.jit.script"):
        torch.jit.script(torch.nn.Sequential(KruskalConv(2, 3, (3, 3), rank=2)))


@needs_torch
@pytest.mark.parametrize("kind", ["cp", "tucker", "grouped-tucker", "merged-modes-cp", "dense"])
def test_jit_trace_of_bare_conv_is_shape_generic(kind):
    # conv() itself records the shape-generic standard convs under a tracer, not the plan of the
    # traced shape: the trace is checked against eager conv() (and F.conv2d) on other shapes
    from tensorconv import TuckerKernel

    g = torch.Generator().manual_seed(0)
    if kind == "cp":
        k = KruskalKernel.random((6, 4, 3, 3), 3, backend="torch", dtype="float64", seed=0)
    elif kind == "merged-modes-cp":  # MobileNet's merged KxK factor: rebuilt dense under a tracer
        k = KruskalKernel(
            torch.rand(3, dtype=torch.float64, generator=g),
            [torch.randn(s, dtype=torch.float64, generator=g) for s in ((6, 3), (4, 3), (3, 3, 3))],
            modes=[(0,), (1,), (2, 3)],
        )
    elif kind == "tucker":
        k = TuckerKernel.random((6, 4, 3, 3), (3, 2), backend="torch", dtype="float64", seed=0)
    elif kind == "grouped-tucker":
        core = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=g)
        k = TuckerKernel(
            core,
            [torch.randn(6, 2, dtype=torch.float64, generator=g), torch.randn(4, 1, dtype=torch.float64, generator=g)],
            groups=2,
        )
    else:
        k = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=g)
    dense = k if kind == "dense" else (k.to_grouped_dense() if kind == "grouped-tucker" else k.to_dense())
    groups = 2 if kind == "grouped-tucker" else 1
    geo = dict(stride=(1, 2), padding=(1, (0, 2)), padding_mode="zeros")
    traced = torch.jit.trace(lambda x: conv(x, k, groups=1, **geo), torch.randn(2, 4, 7, 9, dtype=torch.float64))
    for shape in [(1, 4, 5, 6), (3, 4, 10, 8)]:
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 2, 1, 1)), dense, stride=(1, 2), groups=groups)
        assert rel_err(traced(x), want) < 1e-10
        assert rel_err(conv(x, k, **geo), want) < 1e-10


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
