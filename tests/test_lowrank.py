"""LowRankLinear / LowRankConv against NumPy's SVD and torch's own layers (float64, rel 1e-10)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import rel_err  # noqa: E402
from torch import nn  # noqa: E402

from tensorconv.nn import LowRankConv, LowRankLinear  # noqa: E402


def _truncated(w, r):
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], float(np.sqrt((s[r:] ** 2).sum() / (s**2).sum()))


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_linear_is_the_truncated_svd(rank):
    torch.manual_seed(0)
    dense = nn.Linear(12, 20).double()
    thin = LowRankLinear.from_linear(dense, rank)
    want_w, want_err = _truncated(dense.weight.detach().numpy(), rank)
    x = torch.randn(7, 3, 12, dtype=torch.float64)
    want = x.numpy() @ want_w.T + dense.bias.detach().numpy()
    assert rel_err(thin(x).detach().numpy(), want) < 1e-10
    assert thin.relative_error == pytest.approx(want_err, rel=1e-10, abs=1e-14)
    assert thin.n_params == rank * (12 + 20) and thin.dense_params == 240


@pytest.mark.parametrize("n", [1, 2, 3])
def test_full_rank_1x1_conv_equals_the_conv_with_its_geometry(n):
    torch.manual_seed(n)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1](6, 5, 1, stride=2, padding=1, padding_mode="reflect").double()
    thin = LowRankConv.from_conv(conv, 5)
    x = torch.randn((2, 6) + (7,) * n, dtype=torch.float64)
    assert rel_err(thin(x), conv(x)) < 1e-10
    assert thin.relative_error < 1e-7


def test_a_fraction_sizes_the_rank_and_bad_input_is_named():
    dense = nn.Linear(64, 32)
    assert LowRankLinear.from_linear(dense, 0.25).rank == int(0.25 * 64 * 32 / 96)
    with pytest.raises(ValueError, match="only 1x1"):
        LowRankConv.from_conv(nn.Conv2d(4, 4, 3), 2)
    with pytest.raises(ValueError, match="groups=2"):
        LowRankConv.from_conv(nn.Conv2d(4, 4, 1, groups=2), 2)
    with pytest.raises(ValueError, match="rank=0"):
        LowRankLinear.from_linear(dense, 0)
    with pytest.raises(TypeError, match="rank="):
        LowRankLinear.from_linear(dense, "half")


@pytest.mark.slow
def test_low_rank_layers_train_export_and_compile(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        LowRankConv.from_conv(nn.Conv2d(8, 16, 1), 4),
        nn.ReLU(),
        nn.Flatten(),
        LowRankLinear.from_linear(nn.Linear(16 * 25, 3), 2),
    )
    x = torch.randn(2, 8, 5, 5)
    loss = model(x).square().sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    exported = torch.export.export(model, (x,))
    assert rel_err(exported.module()(x), model(x)) < 1e-6  # float32: stated 1e-6
    compiled = torch.compile(model, fullgraph=True)  # the default backend (inductor), as users run it
    assert rel_err(compiled(x), model(x)) < 1e-5  # float32, inductor's own kernels: stated 1e-5
