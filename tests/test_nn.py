"""torch layers: forward vs F.convNd with the layer's dense kernel, init, from_conv, transduct, rank selection."""

import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from conftest import needs_torch, rel_err  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from oracles import np_conv, torch_conv  # noqa: E402

import tensorconv.nn as tnn  # noqa: E402
from tensorconv import HOCPBlock, KruskalConv, TuckerConv, TuckerKernel, conv  # noqa: E402

TOL = 1e-10
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pairs(padding, n):
    if isinstance(padding, int):
        return ((padding, padding),) * n
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


@pytest.mark.parametrize("cls", [KruskalConv, TuckerConv])
@given(n=st.integers(1, 3), data=st.data())
def test_forward_equals_dense_conv(cls, n, data):
    c, t = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    ks = tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    stride = tuple(data.draw(st.integers(1, 2)) for _ in range(n))
    dilation = tuple(data.draw(st.integers(1, 2)) for _ in range(n))
    padding = tuple((data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))) for _ in range(n))
    mode = data.draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    strategy = data.draw(st.sampled_from(["auto", "factorized", "reconstructed"]))
    rank = (
        data.draw(st.integers(1, 4))
        if cls is KruskalConv
        else (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    )
    layer = cls(
        c,
        t,
        ks,
        rank=rank,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=mode,
        dtype=torch.float64,
        strategy=strategy,
    )
    dims = tuple(max(dl * (k - 1) + 1, lo + 1, hi + 1) + 2 for k, dl, (lo, hi) in zip(ks, dilation, padding))
    x = torch.randn((2, c) + dims, dtype=torch.float64)
    with torch.no_grad():
        expected = torch_conv(
            x.numpy(),
            layer.kernel.to_dense().numpy(),
            stride=stride,
            padding=padding,
            dilation=dilation,
            padding_mode=mode,
        ) + layer.bias.numpy().reshape((-1,) + (1,) * n)
        assert rel_err(layer(x), expected) < TOL


def test_four_dimensional_layer_matches_numpy_reference_and_acceptance():
    layer = KruskalConv(16, 32, (3, 3, 3, 3), rank=8, padding=1)
    x = torch.randn(2, 16, 5, 6, 7, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 32, 5, 6, 7, 8)
    y.square().mean().backward()
    assert x.grad is not None and all(f.grad is not None for f in layer.factors) and layer.weights.grad is not None
    small = KruskalConv(
        2, 3, (2, 3, 2, 2), rank=3, stride=(1, 2, 1, 1), padding=((1, 0), 1, 0, (0, 1)), dtype=torch.float64
    )
    xs = torch.randn(1, 2, 4, 5, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        expected = np_conv(
            xs.numpy(), small.kernel.to_dense().numpy(), stride=(1, 2, 1, 1), padding=((1, 0), (1, 1), (0, 0), (0, 1))
        ) + small.bias.numpy().reshape(-1, 1, 1, 1, 1)
        assert rel_err(small(xs), expected) < TOL


@pytest.mark.parametrize("strategy", ["auto", "factorized", "reconstructed"])
def test_the_bias_goes_into_the_convs_own_output(strategy, monkeypatch):
    """Without autograd a layer with a bias adds it into the tensor conv() returned, with no
    second output-sized tensor per call (fresh pages in a plain process: out + bias cost a
    layer1-sized CP conv a fifth of its time); with it, gradients reach the input, the factors
    and the bias as for F.conv3d with the dense kernel, in float64 at 1e-10."""
    from tensorconv.nn import _forward

    returned = []

    def recording_conv(*args, **kwargs):
        returned.append(conv(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(_forward, "conv", recording_conv)
    layer = KruskalConv(3, 4, (3, 3, 2), rank=5, padding=1, strategy=strategy, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y = layer(x)
        assert y.data_ptr() == returned[-1].data_ptr()
        assert rel_err(y, F.conv3d(x, layer.kernel.to_dense(), layer.bias, padding=1)) < TOL
    y = layer(x)
    dense = layer.kernel.to_dense()
    expected = F.conv3d(x, dense, layer.bias, padding=1)
    assert rel_err(y, expected) < TOL
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.bias, *layer.factors), g)
    want = torch.autograd.grad(expected, (x, layer.bias, *layer.factors), g)
    assert all(rel_err(a, b) < TOL for a, b in zip(got, want))


def test_vmap_over_a_batch_of_biases_equals_a_loop():
    """Under torch.func transforms the bias is added out of place: vmap may batch the bias
    while conv()'s output is not batched, which an in-place add cannot take."""
    layer = KruskalConv(3, 4, (3, 3), rank=5, padding=1, dtype=torch.float64)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    biases = torch.randn(3, 4, dtype=torch.float64)
    params = dict(layer.named_parameters())

    def run(bias):
        return torch.func.functional_call(layer, {**params, "bias": bias}, (x,))

    got = torch.func.vmap(run)(biases)
    with torch.no_grad():
        for i, bias in enumerate(biases):
            assert rel_err(got[i], F.conv2d(x, layer.kernel.to_dense(), bias, padding=1)) < TOL


@pytest.mark.parametrize("cls", [KruskalConv, TuckerConv])
def test_gradcheck(cls):
    rank = 2 if cls is KruskalConv else (2, 2)
    layer = cls(2, 3, (3, 2), rank=rank, stride=(2, 1), padding=1, dtype=torch.float64)
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_init_matches_torch_default_statistics():
    torch.manual_seed(0)
    for cls, rank in ((KruskalConv, 64), (TuckerConv, (32, 32))):
        layer = cls(64, 64, (3, 3), rank=rank)
        ref = torch.nn.Conv2d(64, 64, 3)
        w = layer.kernel.to_dense().detach()
        target = ref.weight.var().item()  # 1 / (3 * fan_in)
        assert abs(w.mean().item()) < 0.1 * target**0.5
        assert 0.7 < w.var().item() / target < 1.3, (cls, w.var().item(), target)
        assert torch.isfinite(w).all()


def test_rank_options_and_errors():
    assert KruskalConv(16, 16, (3, 3), rank="same").n_params == pytest.approx(16 * 16 * 9, rel=0.05)
    half = KruskalConv(16, 16, (3, 3), rank=0.5)
    assert half.n_params == pytest.approx(0.5 * 16 * 16 * 9, rel=0.1)
    assert KruskalConv(4, 4, 3, rank=2, n_spatial=3).kernel_size == (3, 3, 3)
    same = TuckerConv(16, 32, (3, 3, 3), rank="same")
    assert 0.8 * same.dense_params <= same.n_params <= same.dense_params
    # ResNeXt's block with a core in 2 groups: even full ranks stay under the dense budget, so the
    # ranks stop at the channels
    assert TuckerConv(16, 32, (3, 3, 3), rank="same", core_groups=2).rank == (32, 16)
    quarter = TuckerConv(16, 16, (3, 3), rank=0.25)
    assert 0.15 * quarter.dense_params <= quarter.n_params <= 0.25 * quarter.dense_params
    with pytest.raises(ValueError, match="n_spatial"):
        KruskalConv(4, 4, 3, rank=2)
    with pytest.raises(ValueError, match="rank must be"):
        KruskalConv(4, 4, (3, 3), rank=0)
    with pytest.raises(ValueError, match="stride"):
        KruskalConv(4, 4, (3, 3), rank=2, stride=0)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        KruskalConv(4, 4, (3, 3), rank=2, stride=2, padding="same")
    layer = KruskalConv(4, 4, (3, 3), rank=2)
    with pytest.raises(ValueError, match="expects input"):
        layer(torch.randn(1, 4, 5, 5, 5))
    with pytest.raises(ValueError, match="channel mismatch"):
        layer(torch.randn(1, 3, 5, 5))


def test_state_dict_deepcopy_pickle_and_to():
    layer = KruskalConv(3, 4, (3, 3), rank=2, padding="same")
    x = torch.randn(1, 3, 5, 5)
    clone = KruskalConv(3, 4, (3, 3), rank=2, padding="same")
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone(x), layer(x))
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), layer(x))
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), layer(x))
    double = layer.to(torch.float64)
    assert double.kernel.dtype == torch.float64 and double(x.double()).dtype == torch.float64
    text = repr(layer)
    assert "rank=2" in text and "dense 108" in text


def _low_rank_conv(cls_conv, c, t, ks, rank, **kw):
    conv = cls_conv(c, t, ks, **kw).double()
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(d, rank, generator=g, dtype=torch.float64) for d in (t, c) + ks]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("tr,sr,hr,wr->tshw" if len(ks) == 2 else "tr,sr,dr,hr,wr->tsdhw", *factors))
    return conv


@pytest.mark.parametrize("dims", [2, 3])
def test_from_conv_round_trip_keeps_geometry(dims):
    ks = (3, 2) if dims == 2 else (2, 3, 2)
    cls_conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    kw = dict(
        stride=(2, 1) if dims == 2 else (1, 2, 1),
        padding=(1, 0) if dims == 2 else (0, 1, 1),
        dilation=(1, 2) if dims == 2 else (2, 1, 1),
        padding_mode="reflect" if dims == 2 else "zeros",
    )
    conv = _low_rank_conv(cls_conv, 4, 5, ks, 3, **kw)
    layer = KruskalConv.from_conv(conv, rank=3, n_iter_max=2000, tol=1e-16)
    assert layer.relative_error < 1e-6
    assert layer.stride == tuple(conv.stride) and layer.dilation == tuple(conv.dilation)
    assert layer.padding_mode == conv.padding_mode and layer.kernel.dtype == torch.float64
    x = torch.randn((2, 4) + (9,) * dims, dtype=torch.float64)
    with torch.no_grad():
        y, ref = layer(x), conv(x)
        assert y.shape == ref.shape
        assert rel_err(y, ref) < 1e-5
        back = layer.to_dense_conv()
        assert rel_err(back(x), y) < TOL


def test_tucker_from_conv_exact_at_full_rank_and_grouped():
    conv = torch.nn.Conv2d(6, 4, 3, padding=1, groups=2).double()
    layer = TuckerConv.from_conv(conv, rank=(4, 6))
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert layer.groups == 2 and layer.relative_error < 1e-12
        assert rel_err(layer(x), conv(x)) < TOL
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        KruskalConv.from_conv(conv, rank=4)


def test_padding_same_layer():
    layer = KruskalConv(3, 5, (4, 3), rank=2, padding="same", dtype=torch.float64)
    x = torch.randn(1, 3, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = F.conv2d(x, layer.kernel.to_dense(), layer.bias, padding="same")
        assert rel_err(layer(x), ref) < TOL
        assert rel_err(layer.to_dense_conv()(x), ref) < TOL


@pytest.mark.parametrize("padding", [0, 1, (1, 0, 2), "same", "valid", (1, (0, 2), 1)])
def test_layer_padding_reads_as_nn_convnd(padding):
    """``layer.padding`` as nn.Conv3d says it (one int per dim, or the string); a dim padded
    unevenly, which nn.Conv3d cannot express, keeps its (low, high) pair."""
    from tensorconv.nn import TuckerConv

    for cls in (KruskalConv, TuckerConv):
        layer = cls(3, 4, (3, 3, 3), rank=2 if cls is KruskalConv else (2, 2), padding=padding)
        if isinstance(padding, tuple) and isinstance(padding[1], tuple):
            assert layer.padding == padding
            with pytest.raises(ValueError, match="asymmetric"):
                layer.to_dense_conv()
        else:
            assert layer.padding == torch.nn.Conv3d(3, 4, 3, padding=padding).padding, cls
            assert layer.to_dense_conv().padding == layer.padding
        assert ("padding=" in repr(layer)) == (padding != 0)


@pytest.mark.parametrize("device", DEVICES)
def test_transduct_center_is_frame_by_frame_and_ones_is_windowed_sum(device):
    layer = KruskalConv(3, 4, (3, 3), rank=3, padding=1, dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 5, 6, 6, dtype=torch.float64, device=device)
    with torch.no_grad():
        frames = torch.stack([layer(x[:, :, f]) for f in range(5)], 2)
        center = copy.deepcopy(layer).transduct(3, init="center")
        assert center.kernel.dtype == torch.float64 and center.factors[2].device.type == device
        assert rel_err(center(x), frames) < TOL
        ones = copy.deepcopy(layer).transduct(3, padding=0)
        bias = layer.bias.reshape(1, -1, 1, 1, 1)
        windowed = sum(frames[:, :, j : j + 3] - bias for j in range(3)) + bias
        assert rel_err(ones(x), windowed) < TOL


def test_transduct_freezes_all_but_new_factor_and_model_helper():
    model = torch.nn.Sequential(
        KruskalConv(3, 4, (3, 3), rank=2, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.MaxPool2d(2),
        KruskalConv(4, 2, (3, 3), rank=2, padding=1),
    )
    model[1].running_mean.fill_(0.5)
    with _no_warning():
        tnn.transduct(model, 3)
    assert isinstance(model[1], torch.nn.BatchNorm3d) and torch.all(model[1].running_mean == 0.5)
    assert isinstance(model[2], torch.nn.MaxPool3d) and model[2].kernel_size == (1, 2, 2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".factors.2" in n or n.startswith("1.") for n in trainable), trainable
    y = model(torch.randn(2, 3, 4, 8, 8))
    assert y.shape == (2, 2, 4, 4, 4)
    y.sum().backward()
    assert model[0].factors[2].grad is not None and model[0].factors[0].grad is None
    model[0].prune(0.0)  # keeps every component (no lambda is 0)
    model[0].unfreeze()
    assert all(p.requires_grad for p in model[0].parameters())


class _no_warning:
    def __enter__(self):
        import warnings

        self.cm = warnings.catch_warnings()
        self.cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self.cm.__exit__(*exc)


def test_lasso_changes_lambda_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(KruskalConv(3, 4, (3, 3), rank=5, padding=1), HOCPBlock(4, 4, (3, 3), rank=3))
    x = torch.randn(2, 3, 6, 6)
    loss = model(x).square().mean()
    grads = torch.autograd.grad(loss, [model[0].weights, model[1].weights], retain_graph=True)
    reg = loss + tnn.lasso(model, 0.1)
    grads_reg = torch.autograd.grad(reg, [model[0].weights, model[1].weights])
    for g, gr, w in zip(grads, grads_reg, [model[0].weights, model[1].weights]):
        assert torch.allclose(gr - g, 0.1 * torch.sign(w))


def test_prune_keeps_outputs_of_kept_components():
    layer = KruskalConv(3, 4, (3, 3), rank=6, padding=1, dtype=torch.float64)
    with torch.no_grad():
        layer.weights.copy_(torch.tensor([1.0, 1e-4, -2.0, 0.0, 0.5, -1e-5], dtype=torch.float64))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    zeroed = copy.deepcopy(layer)
    with torch.no_grad():
        zeroed.weights[layer.weights.abs() <= 1e-3] = 0
        expected = zeroed(x)
    stats = tnn.prune(torch.nn.Sequential(layer), 1e-3)
    assert stats == {"0": (6, 3)}
    assert layer.rank == 3 and layer.n_params == 3 * (3 + 4 + 6) + 3
    with torch.no_grad():
        assert rel_err(layer(x), expected) < TOL
    with pytest.raises(ValueError, match="every rank component"):
        layer.prune(100.0)


def test_hocp_block_without_nonlinearity_is_a_kruskal_conv_and_skip():
    block = HOCPBlock(4, 4, (3, 3), rank=3, nonlinearity=None, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(block(x), block.conv(x)) < TOL
        skip = HOCPBlock(4, 5, (3, 3), rank=3, nonlinearity=None, skip=True, dtype=torch.float64)
        expected = x + torch.einsum("btyx,ct->bcyx", skip.conv(x), skip.skip_factor)
        assert rel_err(skip(x), expected) < TOL
    default = HOCPBlock(4, 4, (3, 3, 3, 3), rank=3)
    assert default(torch.randn(2, 4, 3, 3, 3, 3)).shape == (2, 4, 3, 3, 3, 3)


def test_training_smoke_loss_halves():
    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(2, 3, 3, padding=1)
    model = torch.nn.Sequential(
        KruskalConv(2, 8, (3, 3), rank=6, padding=1), torch.nn.ReLU(), KruskalConv(8, 3, (3, 3), rank=6, padding=1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 2, 8, 8)
    with torch.no_grad():
        y = teacher(x)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() <= 0.5 * first, (first, loss.item())


def test_import_tensorconv_nn_is_lazy():
    import subprocess
    import sys

    code = (
        "import sys, tensorconv; assert 'torch' not in sys.modules; tensorconv.KruskalConv; "
        "assert 'torch' in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_positional_arguments_are_nn_convnds():
    """`KruskalConv(3, 8, (3, 3), 2)` means stride 2, as for nn.Conv2d; rank is keyword-only."""
    import inspect

    conv_params = list(inspect.signature(torch.nn.Conv2d).parameters)
    for cls in (KruskalConv, TuckerConv):
        params = inspect.signature(cls).parameters
        assert list(params)[: len(conv_params)] == conv_params, cls
        assert params["rank"].kind is inspect.Parameter.KEYWORD_ONLY and params["rank"].default == "same"
    layer = KruskalConv(3, 8, (3, 3), 2, 1)
    dense = torch.nn.Conv2d(3, 8, (3, 3), 2, 1)
    x = torch.randn(1, 3, 9, 9)
    assert layer(x).shape == dense(x).shape == (1, 8, 5, 5)
    assert layer.n_params <= layer.dense_params * 1.01  # rank "same" by default
    assert TuckerConv(4, 8, (3, 3), 1, 1, 1, 2).groups == 2  # groups in nn.ConvNd's place
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        KruskalConv(4, 8, (3, 3), 1, 1, 1, 2)
    with pytest.raises(TypeError):
        KruskalConv(3, 8, (3, 3), 2, 1, 1, 1, True, "zeros", None, None, 4)  # a 12th positional: no rank there


@pytest.mark.parametrize("strategy", ["auto", "factorized", "reconstructed"])
@pytest.mark.parametrize(
    "make",
    [
        lambda s: KruskalConv(4, 6, (3, 3), 2, rank=1, strategy=s),
        lambda s: TuckerConv(4, 6, (3, 3), 2, rank=(1, 2), strategy=s),
        lambda s: KruskalConv(4, 1, (3, 3), (2, 1), rank=2, strategy=s),
    ],
    ids=["cp-rank1", "tucker-rout1", "one-output-channel"],
)
def test_float32_backward_with_one_channel_steps_batch_one_and_stride(make, strategy):
    """A step with one output channel, batch 1 and stride 2 (ATen's slow_conv2d backward): the
    gradients equal those of F.conv2d with the layer's dense kernel (float32, rel 1e-5)."""
    torch.manual_seed(0)
    layer = make(strategy)
    x = torch.randn(1, 4, 7, 6, requires_grad=True)
    out = layer(x)
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad(out.square().sum(), params)
    dense = F.conv2d(x, layer.kernel.to_dense(), layer.bias, layer.stride)
    want = torch.autograd.grad(dense.square().sum(), params)
    assert rel_err(out.detach(), dense.detach()) < 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_meta_device_layers_infer_shapes():
    """Deferred init / shape inference on the meta device (no autocast there): the output shape
    is the dense conv's."""
    for cls in (KruskalConv, TuckerConv):
        layer = cls(4, 6, (3, 3), 2, 1, rank=2, device="meta")
        dense = torch.nn.Conv2d(4, 6, 3, 2, 1, device="meta")
        x = torch.empty(2, 4, 9, 8, device="meta")
        assert layer(x).shape == dense(x).shape and layer(x).device.type == "meta"
        assert layer.kernel.to_dense().shape == dense.weight.shape


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
