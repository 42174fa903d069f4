"""Compile and export models with factorized layers, N = 1..3: torch.compile(fullgraph=True),
torch.export and torch.onnx.export (run by onnxruntime), each against the eager model.

Under tracing the layers record standard convs (a CP layer: 1x1 -> one depthwise conv per mode
-> 1x1; Tucker: 1x1 -> core conv -> 1x1), so the exported graphs hold standard ops only.
onnx, onnxruntime and onnxscript are test extras: CI runs the ONNX test (no skip there).
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import rel_err  # noqa: E402

from tensorconv.nn import HOCPBlock, KruskalConv, TuckerConv  # noqa: E402

STANDARD_ONNX_OPS = {
    "Conv",
    "ConvTranspose",
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
