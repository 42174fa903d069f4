"""Every derivation of the paper, both directions, against an independent dense convolution."""

import numpy as np
import pytest
from conftest import rel_err, to_backend, to_numpy, torch
from hypothesis import given
from hypothesis import strategies as st
from oracles import np_conv, reference_conv

from tensorconv import KruskalKernel, conv
from tensorconv.architectures import from_torch
from tensorconv.cli import main as cli_main
from tensorconv.derivations import DERIVATIONS

TOL = 1e-10


def _oracle_block(x, layers):
    """The block run layer by layer with the oracle convolution (numpy in, numpy out)."""
    for layer in layers:
        w = to_numpy(layer.weight)
        n = w.ndim - 2
        x = reference_conv(
            x,
            w,
            stride=layer.stride or 1,
            padding=layer.padding or ((0, 0),) * n,
            dilation=layer.dilation or 1,
            groups=layer.groups,
            padding_mode=layer.padding_mode,
        )
    return x


@st.composite
def cases(draw, name):
    d = DERIVATIONS[name]
    n = draw(st.sampled_from(d.dims))
    seed = draw(st.integers(0, 2**20))
    if name == "pointwise":
        geo = dict(stride=(1,) * n, padding=((0, 0),) * n, dilation=(1,) * n)
    else:
        geo = dict(
            stride=tuple(draw(st.integers(1, 2)) for _ in range(n)),
            padding=tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(n)),
            dilation=tuple(draw(st.integers(1, 2)) for _ in range(n)),
        )
    return n, seed, geo


def _run(name, backend, n, seed, geo):
    d = DERIVATIONS[name]
    rng = np.random.default_rng(seed)
    kernel = d.make_kernel(rng, n, backend[0], "float64", backend[1])
    dense = to_numpy(kernel if not hasattr(kernel, "to_dense") else kernel.to_dense())
    ks = dense.shape[2:]
    spans = [dl * (k - 1) + 1 for k, dl in zip(ks, geo["dilation"])]
    dims = tuple(int(rng.integers(s, s + 4)) for s in spans)
    x = rng.standard_normal((2, dense.shape[1]) + dims)
    xb = to_backend(x, backend)
    expected = reference_conv(x, dense, **geo)  # the dense conv, computed independently
    # kernel form -> block form: the block (run by the oracle) equals the dense conv
    layers = d.to_block(kernel, **geo)
    assert rel_err(_oracle_block(x, layers), expected) < TOL
    # kernel form run by tensorconv equals the dense conv
    assert rel_err(conv(xb, kernel, **geo), expected) < TOL
    # block form -> kernel form: the recovered kernel gives the same convolution
    back = d.to_kernel(layers)
    assert rel_err(conv(xb, back, **geo), expected) < TOL


def _make_test(name):
    @given(case=cases(name))
    def test(backend, case):
        _run(name, backend, *case)

    test.__name__ = f"test_derivation_{name}"
    return test


for _name in DERIVATIONS:
    globals()[f"test_derivation_{_name}"] = _make_test(_name)


@pytest.mark.parametrize("init", ["center", "ones"])
@given(seed=st.integers(0, 2**20), n=st.integers(1, 3))
def test_transduction_equivalence(init, seed, n):
    rng = np.random.default_rng(seed)
    c, t, r = (int(v) for v in rng.integers(1, 4, size=3))
    ks = tuple(int(k) for k in rng.integers(1, 4, size=n))
    k = KruskalKernel.random((t, c) + ks, r, seed=seed)
    kt = 3
    frames = int(rng.integers(3, 6))
    x = rng.standard_normal((1, c, frames) + tuple(int(rng.integers(k_, k_ + 3)) for k_ in ks))
    big = k.transduct(kt, init=init)
    frame_outs = [np_conv(x[:, :, f], k.to_dense(), padding=1) for f in range(frames)]
    if init == "center":
        got = conv(x, big, padding=((1, 1),) + ((1, 1),) * n)
        expected = np.stack(frame_outs, 2)
    else:
        got = conv(x, big, padding=((0, 0),) + ((1, 1),) * n)
        expected = np.stack([sum(frame_outs[f : f + kt]) for f in range(frames - kt + 1)], 2)
    assert rel_err(got, expected) < TOL


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_from_torch_mobilenet_v2_acceptance():
    nn = torch.nn
    c, t_exp, out = 4, 3, 5
    block = nn.Sequential(
        nn.Conv2d(c, t_exp * c, 1, bias=False),
        nn.Conv2d(t_exp * c, t_exp * c, 3, padding=1, groups=t_exp * c, bias=False),
        nn.Conv2d(t_exp * c, out, 1, bias=False),
    ).double()
    match = from_torch(block)
    assert match.derivation == "mobilenet_v2" and isinstance(match.kernel, KruskalKernel)
    x = torch.randn(2, c, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(match(x), block(x)) < TOL


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_from_torch_other_blocks_and_batchnorm():
    nn = torch.nn
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).double()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    cases = {
        "mobilenet_v1": nn.Sequential(
            nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False), nn.Conv2d(4, 6, 1), bn
        ),
        "resnext": nn.Sequential(
            nn.Conv2d(4, 8, 1, bias=False), nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False), nn.Conv2d(6, 5, 1)
        ),
        "xception": nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.Conv2d(6, 6, 3, dilation=2, groups=6, bias=False)),
    }
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    for name, block in cases.items():
        block = block.double().eval()
        match = from_torch(block)
        assert match.derivation == name
        with torch.no_grad():
            assert rel_err(match(x), block(x)) < TOL


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_from_torch_errors():
    nn = torch.nn
    with pytest.raises(ValueError, match=r"layer 1 \(ReLU\) breaks linearity"):
        from_torch(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="do not chain"):
        from_torch(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(5, 5, 3, groups=5)))
    with pytest.raises(ValueError, match="training mode"):
        from_torch(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="bias"):
        from_torch(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, groups=4, padding=1)))


def test_verify_cli_passes_and_fails_when_a_derivation_is_broken(monkeypatch, capsys, tmp_path):
    assert cli_main(["verify", "--backend", "numpy", "--cases", "3", "--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "mobilenet_v2" in out and "FAIL" not in out
    d = DERIVATIONS["cp"]
    original = d.to_block

    def corrupted(kernel, **geo):
        layers = original(kernel, **geo)
        layers[0].weight = layers[0].weight * 1.001  # a wrong input factor
        return layers

    monkeypatch.setattr(d, "to_block", corrupted)
    assert cli_main(["verify", "--backend", "numpy", "--cases", "2", "--derivation", "cp"]) == 1
    assert "FAIL" in capsys.readouterr().out


@given(n=st.integers(1, 4), c=st.integers(1, 5), t=st.integers(1, 5), seed=st.integers(0, 2**20))
def test_pointwise_conv_is_the_channel_mode_product(backend, n, c, t, seed):
    from tensorconv import mode_dot
    from tensorconv.architectures import matrix_to_pointwise, pointwise_to_matrix

    rng = np.random.default_rng(seed)
    m = rng.standard_normal((t, c))
    x = rng.standard_normal((2, c) + tuple(int(d) for d in rng.integers(1, 5, size=n)))
    expected = np.einsum("tc,bc...->bt...", m, x)  # the definition of x ×_1 M
    xb, mb = to_backend(x, backend), to_backend(m, backend)
    w = matrix_to_pointwise(mb, n)
    assert tuple(w.shape) == (t, c) + (1,) * n
    assert rel_err(conv(xb, w), expected) < TOL
    assert rel_err(mode_dot(xb, pointwise_to_matrix(w), 1), expected) < TOL


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_blocks_accept_padding_strings(padding):
    from tensorconv import TuckerKernel
    from tensorconv.architectures import kruskal_to_block, tucker_to_block

    x = np.random.default_rng(0).standard_normal((1, 3, 7, 6))
    for k in (KruskalKernel.random((4, 3, 4, 3), 2, seed=0), TuckerKernel.random((4, 3, 4, 3), (2, 2), seed=1)):
        to_block = kruskal_to_block if isinstance(k, KruskalKernel) else tucker_to_block
        expected = reference_conv(x, k.to_dense(), padding=((1, 2), (1, 1)) if padding == "same" else 0)
        assert rel_err(_oracle_block(x, to_block(k, padding=padding)), expected) < TOL


def test_verify_takes_the_papers_names(capsys):
    """`--derivation bottleneck` runs the Tucker derivation (the ResNet bottleneck), and the table
    says both names."""
    assert (
        cli_main(
            ["verify", "--backend", "numpy", "--cases", "2", "--derivation", "bottleneck", "--derivation", "Kruskal"]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "tucker/bottleneck" in table and "cp/kruskal" in table and "2 passed" in table
    with pytest.raises(SystemExit, match="paper's names"):
        cli_main(["verify", "--derivation", "inception"])
