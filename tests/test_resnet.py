"""hocp_resnet18 and whole-network transduction (paper sec. 5).

Oracles: ResNet-18's dense parameter count written out from its topology; the 2-D network run
frame by frame (the transducted 3-D network must equal its frame average, exactly, in float64);
torch's F.conv2d for the TRL's contraction.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import rel_err  # noqa: E402

from tensorconv.nn import KruskalConv, TensorRegression, factorized_layers, hocp_resnet18, transduct  # noqa: E402


def _dense_resnet18_conv_params(in_channels):
    """Weights of torchvision's ResNet-18 convs, from the topology (stem 7x7, 8 basic blocks, 3 projections)."""
    total = 64 * in_channels * 49
    c_in = 64
    for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):
            total += c * c_in * 9 + c * c * 9
            if i == 0 and (stride != 1 or c_in != c):
                total += c * c_in
            c_in = c
    return total


def test_rank_same_matches_resnet18s_dense_conv_parameters():
    net = hocp_resnet18(3, 2, head="linear")
    conv_params = sum(layer.n_params for _, layer in factorized_layers(net))
    dense = _dense_resnet18_conv_params(3)
    assert dense == 11_166_912  # torchvision resnet18: 11.69 M minus fc (513k) and BN (9.6k)
    assert abs(conv_params - dense) <= 0.01 * dense  # rank "same" rounds to the nearest rank per layer
    assert all(
        abs(layer.n_params - layer.dense_params) <= 0.01 * layer.dense_params for _, layer in factorized_layers(net)
    )
    assert len(factorized_layers(net)) == 20  # 17 3x3/7x7 convs + 3 projections, every one CP


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("head", ["linear", "trl"])
def test_forward_and_backward_for_any_n(n, head):
    net = hocp_resnet18(2, 3, n_spatial=n, head=head, stem="small", width=0.125, blocks=(1, 1, 1, 1))
    x = torch.randn((2, 2) + (12,) * n)
    out = net(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("head", ["linear", "trl"])
@pytest.mark.parametrize("stem", ["small", "imagenet"])
def test_transducted_network_equals_the_2d_network_averaged_over_frames(head, stem):
    torch.manual_seed(0)
    net2d = hocp_resnet18(1, 2, head=head, stem=stem, width=0.25, dtype=torch.float64)
    # train-mode steps give the norms non-trivial running statistics before evaluating
    for _ in range(2):
        net2d(torch.randn(4, 1, 24, 20, dtype=torch.float64))
    net2d.eval()
    net3d = transduct(copy.deepcopy(net2d), 3, init="center")
    clip = torch.randn(2, 1, 5, 24, 20, dtype=torch.float64)
    with torch.no_grad():
        per_frame = torch.stack([net2d(clip[:, :, t]) for t in range(clip.shape[2])]).mean(0)
        got = net3d(clip)
    assert rel_err(got, per_frame) < 1e-10
    # every CP conv gained a temporal factor, and only those train until unfrozen
    for _, layer in factorized_layers(net3d):
        assert layer.n_spatial == 3 and layer.kernel_size[0] == 3
    trainable = [p for p in net3d.parameters() if p.requires_grad]
    assert len(trainable) == len(factorized_layers(net3d))
    assert all(p.shape[0] == 3 for p in trainable)


def test_transduct_with_ones_mixes_frames_and_trains_the_new_factors():
    torch.manual_seed(1)
    net = transduct(hocp_resnet18(1, 2, head="trl", stem="small", width=0.125, blocks=(1, 1, 1, 1)), 3, init="ones")
    clip = torch.randn(2, 1, 4, 12, 12)
    loss = net(clip).square().sum()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_tensor_regression_is_the_full_contraction_with_its_cp_weight():
    torch.manual_seed(2)
    head = TensorRegression(4, 3, (2, 3), rank=5, dtype=torch.float64)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    f = [p.detach() for p in head.factors]
    weight = torch.einsum("cr,hr,wr,or->ochw", *f)  # the dense (O, C, H, W) weight
    expected = torch.nn.functional.conv2d(x, weight).flatten(1) + head.bias  # full-size conv == <X, W>
    assert rel_err(head(x), expected) < 1e-12
    # an input larger than the grid is averaged to it first (torch's adaptive bins)
    big = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    pooled = torch.nn.functional.adaptive_avg_pool2d(big, (2, 3))
    assert rel_err(head(big), head(pooled)) < 1e-12


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="head='mlp'"):
        hocp_resnet18(3, 2, head="mlp")
    with pytest.raises(ValueError, match="stem='small'"):
        hocp_resnet18(3, 2, n_spatial=4)
    with pytest.raises(ValueError, match="num_outputs=0"):
        hocp_resnet18(3, 0)
    with pytest.raises(ValueError, match="trl_grid"):
        hocp_resnet18(3, 2, trl_grid=(2, 2, 2))
    net = hocp_resnet18(1, 2, stem="small", width=0.125, blocks=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="spatial modes"):
        net.head(torch.randn(1, 64, 2, 2, 2))
    assert isinstance(net.stem[0].conv, KruskalConv)
    assert np.isfinite(float(net(torch.randn(2, 1, 8, 8)).sum()))


def test_pruning_a_network_of_hocp_blocks_cuts_psi_with_the_rank():
    """Psi (a norm over the R channels) must lose the same components as the conv, or the
    next forward fails; the pruned network equals the unpruned one with those lambdas zeroed."""
    from tensorconv.nn import prune

    torch.manual_seed(3)
    net = hocp_resnet18(1, 2, head="linear", stem="small", width=0.125, blocks=(1, 1, 1, 1), dtype=torch.float64)
    net(torch.randn(4, 1, 12, 12, dtype=torch.float64))  # running statistics
    net.eval()
    block = net.layers[0].conv1
    with torch.no_grad():
        block.conv.weights[::3] = 0.0
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        before = net(x)
    old, new = prune(net, threshold=0.0)["layers.0.conv1.conv"]
    assert new < old and block.psi.norm.num_features == new == block.psi.norm.running_mean.numel()
    with torch.no_grad():
        assert rel_err(net(x), before) < 1e-12
