"""tensorconv.nn.factorize / summarize on real torchvision model definitions.

torchvision: the registry's wheels are built for the CUDA torch, and with the CPU torch that CI
installs `import torchvision` fails registering its C ops. Its model definitions need none of
them, so `tensorconv.cli._torchvision.torchvision_models()` imports `torchvision.models` with
the C-op registration stubbed out (see there). torchvision is a test extra (pinned to the
torch of the README's command); if it is missing, CI fails here (no skip), and a local run
without it skips with the reason.
"""

import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import rel_err  # noqa: E402
from torch import nn  # noqa: E402

from tensorconv.cli._torchvision import torchvision_models  # noqa: E402
from tensorconv.nn import KruskalConv, TuckerConv, factorize, summarize  # noqa: E402


@pytest.fixture(scope="module")
def tv():
    try:
        return torchvision_models()
    except ImportError:
        if os.environ.get("CI"):
            raise  # a test extra: CI must have it
        pytest.skip("torchvision is not installed (a test extra)")


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
    assert s.padding == tuple((p, p) for p in o.padding)
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
    full = factorize(model, (128, 128), factorization="tucker", layers=lambda name, m: name == "layer1.0.conv2")
    x = torch.randn(1, 128, 8, 8)
    assert rel_err(full.layer1[0].conv2(x), model.layer1[0].conv2(x)) < 1e-5  # float32


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


def test_factorize_exact_at_full_rank_float64_and_inplace():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2, dtype=torch.float64),
        nn.ReLU(),
        nn.Conv1d(4, 2, 3, padding="same", dtype=torch.float64),
    )
    x = torch.randn(2, 3, 17, dtype=torch.float64)
    expected = net(x)
    full = factorize(net, lambda name, m: (m.out_channels, m.in_channels), factorization="tucker", inplace=True)
    assert full is net and isinstance(net[0], TuckerConv)
    assert rel_err(full(x), expected.detach()) < 1e-10
    ranks = []
    factorize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)), lambda n, m: ranks.append(n) or 2, n_iter_max=3)
    assert ranks == ["0", "1"]


def test_bad_inputs_are_clear_errors():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"factorization='svd' is not one of \('cp', 'tucker'\)"):
        factorize(net, 2, factorization="svd")
    with pytest.raises(ValueError, match="rank=0"):
        factorize(net, 0)
    with pytest.raises(ValueError, match="rank='half'"):
        factorize(net, "half")
    with pytest.raises(ValueError, match="no eligible convolution"):
        factorize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(2, 2)), 2)
    with pytest.raises(ValueError, match="none chosen"):
        factorize(net, 2, layers=lambda n, m: False)
    with pytest.raises(ValueError, match="no factorized layer"):
        summarize(net)
    assert np.isfinite(float(factorize(net, 2, n_iter_max=3)(torch.randn(1, 3, 5, 5)).sum()))
