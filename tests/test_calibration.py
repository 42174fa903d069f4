"""calibrate / refit against a direct least-squares oracle (NumPy's lstsq on rows built with
torch's own convs from the rebuilt dense kernels), float64."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tensorconv import KruskalKernel, TuckerKernel  # noqa: E402
from tensorconv.nn import KruskalConv, LowRankConv, LowRankLinear, TuckerConv, factorize  # noqa: E402
from tensorconv.nn.calibration import calibrate, output_rows, refit  # noqa: E402


def _oracle_hidden(layer, x):
    """H from torch's conv2d with the dense kernel of the layer minus its output factor."""
    if isinstance(layer, LowRankLinear):
        return x @ layer.first.weight.T
    if isinstance(layer, LowRankConv):
        return F.conv2d(x, layer.first.weight, stride=layer.first.stride, padding=layer.first.padding)
    if isinstance(layer, KruskalConv):
        r = layer.rank
        eye = torch.eye(r, dtype=x.dtype)
        w = KruskalKernel(layer.weights, [eye] + list(layer.factors[1:])).to_dense()
    else:
        eye = torch.eye(layer.rank[0], dtype=x.dtype)
        w = TuckerKernel(layer.core, [eye, layer.factors[1]]).to_dense()
    return F.conv2d(x, w, stride=layer.stride, padding=layer.padding)


def _rows(t, linear):
    return (t if linear else t.movedim(1, -1)).reshape(-1, t.shape[-1] if linear else t.shape[1])


@pytest.mark.parametrize("kind", ["cp", "tucker", "svd-conv", "svd-linear"])
def test_refit_is_the_least_squares_solution(kind):
    torch.manual_seed(0)
    if kind == "cp":
        layer = KruskalConv(4, 6, (3, 3), rank=5, padding=1, stride=(1, 2)).double()
    elif kind == "tucker":
        layer = TuckerConv(4, 6, (3, 3), rank=(3, 2), padding=1).double()
    elif kind == "svd-conv":
        layer = LowRankConv.from_conv(nn.Conv2d(4, 6, 1, stride=2).double(), 3)
    else:
        layer = LowRankLinear.from_linear(nn.Linear(4, 6).double(), 3)
    linear = kind == "svd-linear"
    x = torch.randn((3, 7, 4) if linear else (3, 4, 7, 9), dtype=torch.float64)
    with torch.no_grad():
        h_oracle = _rows(_oracle_hidden(layer, x), linear).numpy()
        h = output_rows(layer, x)
    assert np.abs(h.numpy() - h_oracle).max() < 1e-10 * np.abs(h_oracle).max()
    y = torch.randn(h.shape[0], 6, dtype=torch.float64)
    error = refit(layer, h, y)
    design = np.hstack([h_oracle, np.ones((len(h_oracle), 1))])
    coef, *_ = np.linalg.lstsq(design, y.numpy(), rcond=None)
    w_oracle, b_oracle = coef[:-1].T, coef[-1]
    w = (layer.second.weight if kind.startswith("svd") else layer.factors[0]).detach().reshape(6, -1).numpy()
    b = (layer.second.bias if kind.startswith("svd") else layer.bias).detach().numpy()
    assert np.abs(w - w_oracle).max() < 1e-8 * np.abs(w_oracle).max()
    assert np.abs(b - b_oracle).max() < 1e-8 * max(1.0, np.abs(b_oracle).max())
    residual = np.linalg.norm(design @ coef - y.numpy()) / np.linalg.norm(y.numpy())
    assert error == pytest.approx(residual, rel=1e-8)
    with torch.no_grad():  # the layer now computes the fit
        got = _rows(layer(x), linear).numpy()
    assert np.abs(got - design @ coef).max() < 1e-8 * np.abs(design @ coef).max()


def test_calibrate_brings_a_compressed_model_closer_to_the_dense_one():
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)
    ).double()
    small = factorize(dense, 0.2, n_iter_max=3)
    batches = [torch.randn(4, 3, 10, 10, dtype=torch.float64) for _ in range(3)]
    held_out = torch.randn(8, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        before = ((small(held_out) - dense(held_out)).norm() / dense(held_out).norm()).item()
        errors = calibrate(small, dense, batches, rows=2000, seed=0)
        after = ((small(held_out) - dense(held_out)).norm() / dense(held_out).norm()).item()
    assert set(errors) == {"0", "2", "4"}
    assert after < 0.8 * before, (before, after)


def test_calibrate_says_what_is_missing():
    dense = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(factorize(dense, 0.5), dense, [])
