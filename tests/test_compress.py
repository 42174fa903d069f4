"""tensorconv.nn.factorize / summarize on real torchvision model definitions.

torchvision: the registry's wheels are built for the CUDA torch, and with the CPU torch that CI
installs `import torchvision` fails registering its C ops. Its model definitions need none of
them, so `tensorconv._torchvision.torchvision_models()` imports `torchvision.models` with
the C-op registration stubbed out (see there). torchvision is a test extra (pinned to the
torch of the README's command); if it is missing, CI fails here (no skip), and a local run
without it skips with the reason.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import rel_err  # noqa: E402
from torch import nn  # noqa: E402

from tensorconv import TuckerKernel  # noqa: E402
from tensorconv.nn import KruskalConv, TuckerConv, factorize, summarize  # noqa: E402


def test_factorize_a_torchvision_r3d_18_keeps_geometry_and_leaves_the_original(tv):
    from torchvision.models.video import r3d_18

    torch.manual_seed(0)
    model = r3d_18(num_classes=5).eval()
    small = factorize(
        model,
        0.25,
        factorization="cp",
        n_iter_max=5,
        layers=lambda name, m: name.startswith("layer1") or name.startswith("stem"),
    )
    assert isinstance(model.stem[0], nn.Conv3d)  # untouched
    assert isinstance(small.stem[0], KruskalConv)
    s, o = small.stem[0], model.stem[0]
    assert s.stride == o.stride and s.dilation == o.dilation and s.kernel_size == o.kernel_size
    assert s.padding == o.padding  # read as nn.Conv3d's
    assert isinstance(small.layer2[0].conv1[0], nn.Conv3d)  # not chosen by `layers`
    x = torch.randn(1, 3, 4, 32, 32)
    assert small(x).shape == model(x).shape
    table = summarize(small, (1, 3, 4, 32, 32))
    assert "stem.0" in table and "layer1.0.conv1.0" in table and table.splitlines()[-1].startswith("total")


def test_factorize_tucker_keeps_groups_on_resnext(tv):
    torch.manual_seed(0)
    model = tv.resnext50_32x4d().eval()
    small = factorize(model, 0.5, factorization="tucker", layers=lambda name, m: name == "layer1.0.conv2")
    layer = small.layer1[0].conv2
    assert isinstance(layer, TuckerConv) and layer.groups == 32
    # exact at full rank: the grouped conv comes back
    # exact at full rank (more parameters than the grouped conv: from_conv does what it is asked,
    # factorize would keep such a layer dense)
    full = TuckerConv.from_conv(model.layer1[0].conv2, (128, 128))
    x = torch.randn(1, 128, 8, 8)
    assert rel_err(full(x), model.layer1[0].conv2(x)) < 1e-5  # float32


def test_factorize_refuses_and_reports_rather_than_changing_silently():
    class Conv2dSame(nn.Conv2d):  # timm-style: its own forward
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))

    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2, padding="same", padding_mode="reflect"),
        Conv2dSame(8, 8, 2),
        nn.Conv2d(8, 8, 3, padding="same", padding_mode="circular", bias=False),
        nn.Conv2d(8, 8, 1),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = factorize(net, "same", n_iter_max=5)
    message = "\n".join(str(w.message) for w in caught)
    assert "0: groups=2" in message and "1: " in message and "Conv2dSame" in message
    assert type(out[0]) is nn.Conv2d and type(out[1]) is Conv2dSame and type(out[3]) is nn.Conv2d  # 1x1: ineligible
    assert isinstance(out[2], KruskalConv) and out[2].padding_mode == "circular" and out[2].bias is None
    tucker = factorize(net, "same", factorization="tucker", layers=lambda n, m: n == "0")
    assert isinstance(tucker[0], TuckerConv) and tucker[0].groups == 2 and tucker[0].padding_mode == "reflect"


def test_factorize_exact_on_low_rank_weights_float64_and_inplace():
    """Weights that are exactly Tucker at the asked ranks come back exactly (float64), in place,
    with every geometry argument kept."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2, dtype=torch.float64),
        nn.ReLU(),
        nn.Conv1d(4, 2, 3, padding="same", dtype=torch.float64),
    )
    ranks = {"0": (2, 2), "2": (1, 2)}
    with torch.no_grad():
        for name, r in ranks.items():
            conv = net[int(name)]
            shape = tuple(conv.weight.shape)
            conv.weight.copy_(torch.from_numpy(TuckerKernel.random(shape, r, seed=1).to_dense()))
    x = torch.randn(2, 3, 17, dtype=torch.float64)
    expected = net(x)
    full = factorize(net, lambda name, m: ranks[name], factorization="tucker", inplace=True)
    assert full is net and isinstance(net[0], TuckerConv) and isinstance(net[2], TuckerConv)
    assert rel_err(full(x), expected.detach()) < 1e-10
    called = []
    factorize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)), lambda n, m: called.append(n) or 2, n_iter_max=3)
    assert called == ["0", "1"]


def test_bad_inputs_are_clear_errors():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"factorization='qr' is not one of \('cp', 'tucker', 'svd'\)"):
        factorize(net, 2, factorization="qr")
    with pytest.raises(ValueError, match="rank=0"):
        factorize(net, 0)
    with pytest.raises(ValueError, match="rank='half'"):
        factorize(net, "half")
    with pytest.raises(ValueError, match="no eligible layer for factorization='cp'"):
        factorize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(2, 2)), 2)
    with pytest.raises(ValueError, match="none chosen"):
        factorize(net, 2, layers=lambda n, m: False)
    with pytest.raises(ValueError, match="no factorized layer"):
        summarize(net)
    assert np.isfinite(float(factorize(net, 2, n_iter_max=3)(torch.randn(1, 3, 5, 5)).sum()))


def test_a_conv_used_twice_stays_one_module():
    """Shared modules stay shared: one factorized module wherever the conv was used, in one
    parent (a Sequential) or two (a ModuleDict), so tied weights stay tied."""
    c = nn.Conv2d(4, 4, 3, padding=1)
    seq = factorize(nn.Sequential(c, nn.ReLU(), c), "same", n_iter_max=5)
    assert isinstance(seq[0], KruskalConv) and seq[2] is seq[0]
    x = torch.randn(1, 4, 6, 6)
    assert rel_err(seq(x), seq[0](torch.relu(seq[0](x)))) < 1e-6  # float32
    tied = factorize(nn.ModuleDict({"a": nn.Sequential(c), "b": nn.Sequential(nn.ReLU(), c)}), "same", n_iter_max=5)
    assert isinstance(tied["a"][0], KruskalConv) and tied["b"][1] is tied["a"][0]
    assert len(list(tied.parameters())) == len(list(tied["a"][0].parameters()))


def test_factorize_keeps_requires_grad_training_flag_and_hooks():
    frozen = nn.Conv2d(4, 4, 3)
    frozen.requires_grad_(False)
    seen = []
    handle = frozen.register_forward_hook(lambda module, args, out: seen.append(type(module).__name__))
    frozen.register_forward_pre_hook(lambda module, args: seen.append("pre"))
    model = nn.Sequential(frozen, nn.Conv2d(4, 4, 3)).eval()
    out = factorize(model, 0.5, n_iter_max=5, inplace=True)  # in place: the user's handles are this model's
    assert not any(p.requires_grad for p in out[0].parameters())
    assert all(p.requires_grad for p in out[1].parameters())
    assert not out[0].training and not out[1].training
    out(torch.randn(1, 4, 9, 9))
    assert seen == ["pre", "KruskalConv"]
    handle.remove()  # the user's handle still reaches the hook on the factorized module
    out(torch.randn(1, 4, 9, 9))
    assert seen == ["pre", "KruskalConv", "pre"]
    keyed = nn.Conv2d(4, 4, 3)
    keyed._register_state_dict_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="0 had state_dict_hooks hooks"):
        factorize(nn.Sequential(keyed), 0.5, n_iter_max=5)


def test_layers_that_would_grow_stay_dense_with_one_warning():
    """A depthwise conv at a Tucker fraction (block ranks of at least 1 per group) would grow:
    it stays dense, the warning says why, and summarize lists it as kept dense."""
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.Conv2d(8, 16, 3))
    with pytest.warns(UserWarning, match=r"0: at rank=\(8, 8\) the factorized layer has 88 parameters, not fewer"):
        out = factorize(net, 0.25, factorization="tucker")
    assert type(out[0]) is nn.Conv2d and isinstance(out[1], TuckerConv)
    table = summarize(out, (1, 8, 10, 10))
    row = next(line for line in table.splitlines() if line.startswith("0 "))
    assert "dense" in row and "72 -> 72 (kept)" in row and "7.20k -> 7.20k" in row  # 8 * 10 * 10 outputs * 9
    # "same" asks for the dense conv's parameter count: converted, as asked
    assert isinstance(factorize(nn.Sequential(nn.Conv2d(4, 4, 3)), "same", n_iter_max=3)[0], KruskalConv)


def test_rank_callables_keywords_and_per_layer_rank_errors():
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 16, 3))
    # None from the callable keeps a layer dense, silently (asked for)
    out = factorize(net, lambda name, m: None if name == "0" else 0.5, n_iter_max=3)
    assert type(out[0]) is nn.Conv2d and isinstance(out[1], KruskalConv)
    # a tuple rank that one grouped layer cannot take: that layer is named and left dense
    with pytest.warns(UserWarning, match=r"0: rank=\(2, 2\) does not fit this layer: .*divisible by groups=4"):
        out = factorize(net, (2, 2), factorization="tucker")
    assert type(out[0]) is nn.Conv2d and isinstance(out[1], TuckerConv)
    # lists work like tuples, numpy integers like ints
    assert factorize(net, [np.int64(4), 4], factorization="tucker", layers=lambda n, m: n == "1")[1].rank == (4, 4)
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) 'n_iter'.*valid: .*n_iter_max"):
        factorize(net, 0.25, n_iter=5)
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) 'init'.*partial_tucker_hooi"):
        factorize(net, 0.25, factorization="tucker", init="svd")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_factorize_half_precision_models(dtype):
    """Decomposed in float32, stored in the model's dtype (the docs say the dtype is kept)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False)).to(dtype)
    for factorization in ("cp", "tucker"):
        out = factorize(net, 0.5, factorization=factorization)
        assert {p.dtype for p in out.parameters()} == {dtype}
        assert 0 <= out[0].relative_error < 1
        assert out(torch.randn(1, 4, 9, 9, dtype=dtype)).dtype == dtype


def test_factorize_a_zero_initialised_conv():
    conv = nn.Conv2d(4, 4, 3)
    nn.init.zeros_(conv.weight)
    out = factorize(nn.Sequential(conv), 0.5)
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(out(x), conv(x))  # zero kernel: exactly the bias
    assert out[0].relative_error == 0


def test_summarize_a_model_with_two_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = factorize(Two(), 0.5, n_iter_max=3)
    by_shapes = summarize(model, ((1, 3, 8, 8), (1, 3, 8, 8)))
    by_tensors = summarize(model, (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)))
    assert by_shapes == by_tensors and "7.78k" in by_shapes  # 8 * 6 * 6 outputs * 27
    with pytest.raises(TypeError, match=r"input_shape\[1\]='x'"):
        summarize(model, ((1, 3, 8, 8), "x"))


def test_a_compressed_checkpoint_loads_into_the_skeleton_built_without_decomposing():
    """factorize(..., decompose=False) builds the same layers (ranks, left-dense convs, biases)
    without decomposing: the compressed model's state_dict loads strictly and the outputs match."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3, bias=False)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the depthwise conv stays dense under Tucker (named in a warning)
        for factorization in ("cp", "tucker"):
            compressed = factorize(net, 0.3, factorization=factorization, n_iter_max=5)
            torch.manual_seed(1)
            skeleton = factorize(net, 0.3, factorization=factorization, decompose=False)
            assert [type(m).__name__ for m in skeleton] == [type(m).__name__ for m in compressed]
            x = torch.randn(1, 3, 12, 12)
            assert rel_err(skeleton(x).detach(), compressed(x).detach()) > 1e-3  # not decomposed: differs
            skeleton.load_state_dict(compressed.state_dict(), strict=True)
            assert rel_err(skeleton(x).detach(), compressed(x).detach()) < 1e-6  # float32


def _svd_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1),
        nn.Conv2d(24, 32, 1, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1, groups=4),
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, 16),
    ).double()


def test_factorize_svd_replaces_1x1_convs_and_linear_layers_by_their_truncated_svd():
    net = _svd_net()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"3: groups=4: a SVD factorization mixes all channels"):
        small = factorize(net, 0.25, factorization="svd")
    assert [type(m).__name__ for m in small] == ["Conv2d", "LowRankConv", "ReLU", "Conv2d", "Flatten", "LowRankLinear"]
    assert isinstance(net[1], nn.Conv2d)  # the original is untouched
    # each layer is the truncated SVD of its weight (oracle: NumPy's SVD), geometry kept
    for i in (1, 5):
        w = net[i].weight.detach().reshape(net[i].weight.shape[0], -1).numpy()
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        r = small[i].rank
        assert small[i].relative_error == pytest.approx(np.sqrt((s[r:] ** 2).sum() / (s**2).sum()), rel=1e-10)
        assert small[i].n_params < net[i].weight.numel()
        best = torch.from_numpy((u[:, :r] * s[:r]) @ vt[:r])
        inp = torch.randn(2, 24, 8, 8, dtype=torch.float64) if i == 1 else torch.randn(2, 800, dtype=torch.float64)
        with torch.no_grad():
            if i == 1:
                want = nn.functional.conv2d(inp, best[:, :, None, None], net[1].bias, stride=2, padding=1)
            else:
                want = nn.functional.linear(inp, best, net[5].bias)
            assert rel_err(small[i](inp), want) < 1e-10
    # a checkpoint loads into the skeleton decompose=False builds
    with pytest.warns(UserWarning, match="groups=4"):
        skeleton = factorize(net, 0.25, factorization="svd", decompose=False)
    skeleton.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert rel_err(skeleton(x), small(x)) < 1e-12


def test_factorize_svd_bad_arguments_are_named():
    net = _svd_net()
    with pytest.raises(TypeError, match=r"takes no decomposition keywords, got \['n_iter_max'\]"):
        factorize(net, 0.25, factorization="svd", n_iter_max=5)
    with pytest.raises(ValueError, match="no eligible layer for factorization='svd'"):
        factorize(nn.Sequential(nn.Conv2d(3, 4, 3)), 2, factorization="svd")
    with pytest.raises(ValueError, match="itself one layer; use LowRankConv"):
        factorize(nn.Linear(4, 4), 2, factorization="svd")
    with pytest.warns(UserWarning, match=r"rank=\(2, 2\): a truncated SVD has one rank"):
        factorize(net, lambda n, m: (2, 2) if n == "1" else 2, factorization="svd")
