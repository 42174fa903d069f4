"""The paper's application network (sec. 5): a ResNet-18 whose every convolution is an HO-CP
convolution (eq. 7), any number of spatial dims, with a linear or a tensor regression head.

Every module here works for any N and is either a :class:`KruskalConv` (inside
:class:`HOCPBlock`), a channel norm, a pool that ``transduct`` knows, or a head that averages
the modes transduction adds, so ``tensorconv.nn.transduct`` turns the whole 2-D network into a
3-D one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .hocp import ChannelNorm, HOCPBlock
from .layers import KruskalConv

__all__ = ["hocp_resnet18", "HOCPResNet", "HOCPBasicBlock", "ChannelNorm", "TensorRegression"]

_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


class _MaxPool(nn.Module):
    """Max pool over the spatial modes (window, stride and padding per mode; 1-3 modes), which
    ``transduct`` extends with a window of 1 along a new mode."""

    def __init__(self, kernel_size, stride, padding):
        super().__init__()
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)

    def transduct(self, position):
        ins = lambda seq, v: seq[:position] + (v,) + seq[position:]  # noqa: E731
        self.kernel_size, self.stride = ins(self.kernel_size, 1), ins(self.stride, 1)
        self.padding = ins(self.padding, 0)
        return self

    def forward(self, x):
        n = len(self.kernel_size)
        if n > 3:
            raise ValueError(
                f"max pooling is available for 1-3 spatial modes, this one has {n}: build the "
                f"network with stem='small' for more"
            )
        pool = (nn.functional.max_pool1d, nn.functional.max_pool2d, nn.functional.max_pool3d)[n - 1]
        return pool(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def _adaptive_mean(x, grid):
    """Adaptive average pooling of every spatial mode to ``grid`` (torch's bins; any N): averaging
    a box is averaging along each of its modes in turn."""
    for m, g in enumerate(grid):
        axis = 2 + m
        size = x.shape[axis]
        parts = []
        for i in range(g):
            start, stop = (i * size) // g, -((-(i + 1) * size) // g)
            parts.append(x.narrow(axis, start, stop - start).mean(axis, keepdim=True))
        x = torch.cat(parts, axis)
    return x


class TensorRegression(nn.Module):
    """A CP tensor regression layer: ``y = <X, W> + b`` with W (C, *grid, O) of rank R, contracted
    with the activation mode by mode (no flattening), after averaging it to ``grid`` per mode.

    Modes added by :meth:`transduct` are averaged away first, so a transducted network's head
    sees the mean over the new mode (time) of what it saw per frame, for any clip length.
    """

    def __init__(self, in_channels, num_outputs, grid, rank=16, device=None, dtype=None):
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        if not self.grid or min(self.grid) < 1:
            raise ValueError(f"grid={grid!r}: expected one size >= 1 per spatial mode")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r}: expected an int >= 1")
        self.in_channels, self.num_outputs, self.rank = in_channels, num_outputs, rank
        self.averaged_modes = ()  # positions (among spatial modes) added by transduction
        factory = {"device": device, "dtype": dtype}
        dims = (in_channels,) + self.grid + (num_outputs,)
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(d, rank, **factory)) for d in dims])
        self.bias = nn.Parameter(torch.empty(num_outputs, **factory))
        self.reset_parameters()

    def reset_parameters(self):
        """Gaussian factors scaled so W has nn.Linear's default variance 1 / (3 fan_in); bias 0."""
        fan_in = self.in_channels * math.prod(self.grid)
        std = (1.0 / (3.0 * fan_in) / self.rank) ** (1.0 / (2 * len(self.factors)))
        with torch.no_grad():
            for f in self.factors:
                f.normal_(0.0, std)
            self.bias.zero_()

    def transduct(self, position):
        self.averaged_modes = tuple(sorted(self.averaged_modes + (position,)))
        return self

    def forward(self, x):
        n_in = x.ndim - 2
        if n_in != len(self.grid) + len(self.averaged_modes):
            raise ValueError(
                f"input has {n_in} spatial modes; this head expects {len(self.grid) + len(self.averaged_modes)}"
            )
        if self.averaged_modes:
            x = x.mean(dim=tuple(2 + m for m in self.averaged_modes))
        x = _adaptive_mean(x, self.grid)
        letters = "defghijklmnopq"[: len(self.grid)]
        terms = ["bc" + letters, "cr"] + [f"{ch}r" for ch in letters]
        z = torch.einsum(",".join(terms) + "->br", x, *self.factors[:-1])
        return z @ self.factors[-1].T + self.bias

    def extra_repr(self):
        return f"{self.in_channels}, {self.num_outputs}, grid={self.grid}, rank={self.rank}" + (
            f", averaged_modes={self.averaged_modes}" if self.averaged_modes else ""
        )


class _GlobalMean(nn.Module):
    """Global average pooling over every spatial mode (any N, transduction included)."""

    def forward(self, x):
        return x.mean(dim=tuple(range(2, x.ndim)))


class HOCPBasicBlock(nn.Module):
    """ResNet's basic block with HO-CP convolutions: conv-norm-ReLU-conv-norm + skip, ReLU. The
    skip is a (CP) 1x1 conv + norm where the shape changes, the identity elsewhere."""

    def __init__(self, in_channels, out_channels, stride, n_spatial, rank, device=None, dtype=None):
        super().__init__()
        k3, k1 = (3,) * n_spatial, (1,) * n_spatial
        factory = {"device": device, "dtype": dtype}
        self.conv1 = HOCPBlock(in_channels, out_channels, k3, rank=rank, stride=stride, padding=1, **factory)
        self.bn1 = ChannelNorm(out_channels, **factory)
        self.conv2 = HOCPBlock(out_channels, out_channels, k3, rank=rank, padding=1, **factory)
        self.bn2 = ChannelNorm(out_channels, **factory)
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                KruskalConv(in_channels, out_channels, k1, rank=rank, stride=stride, bias=False, **factory),
                ChannelNorm(out_channels, **factory),
            )
        else:
            self.downsample = None

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + skip)


class HOCPResNet(nn.Module):
    """See :func:`hocp_resnet18`."""

    def __init__(
        self,
        in_channels,
        num_outputs,
        *,
        n_spatial=2,
        rank="same",
        head="trl",
        stem="imagenet",
        blocks=(2, 2, 2, 2),
        width=1.0,
        trl_grid=None,
        trl_rank=16,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_outputs", num_outputs), ("n_spatial", n_spatial)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an int >= 1")
        if head not in ("trl", "linear"):
            raise ValueError(f"head={head!r} is not one of ('trl', 'linear')")
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem={stem!r} is not one of ('imagenet', 'small')")
        if stem == "imagenet" and n_spatial > 3:
            raise ValueError(
                f"stem='imagenet' max-pools, which exists for 1-3 spatial modes; n_spatial={n_spatial} "
                f"needs stem='small'"
            )
        if len(blocks) != len(_STAGES) or min(blocks) < 1:
            raise ValueError(f"blocks={blocks!r}: expected {len(_STAGES)} ints >= 1 (ResNet-18: (2, 2, 2, 2))")
        if not width > 0:
            raise ValueError(f"width={width!r}: expected a number > 0 (channel multiplier)")
        factory = {"device": device, "dtype": dtype}
        self.n_spatial = n_spatial
        widths = [max(1, int(round(c * width))) for c, _ in _STAGES]
        n = n_spatial
        if stem == "imagenet":
            self.stem = nn.Sequential(
                HOCPBlock(in_channels, widths[0], (7,) * n, rank=rank, stride=2, padding=3, **factory),
                ChannelNorm(widths[0], **factory),
                nn.ReLU(),
                _MaxPool((3,) * n, (2,) * n, (1,) * n),
            )
        else:  # small images (CIFAR-style): 3x3, stride 1, no pooling
            self.stem = nn.Sequential(
                HOCPBlock(in_channels, widths[0], (3,) * n, rank=rank, padding=1, **factory),
                ChannelNorm(widths[0], **factory),
                nn.ReLU(),
            )
        layers, c_in = [], widths[0]
        for (_, stride), c, count in zip(_STAGES, widths, blocks):
            for i in range(count):
                layers.append(HOCPBasicBlock(c_in, c, stride if i == 0 else 1, n, rank, **factory))
                c_in = c
        self.layers = nn.Sequential(*layers)
        if head == "linear":
            self.head = nn.Sequential(_GlobalMean(), nn.Linear(c_in, num_outputs, **factory))
        else:
            grid = (2,) * n if trl_grid is None else tuple(trl_grid)
            if len(grid) != n:
                raise ValueError(f"trl_grid={trl_grid!r}: expected {n} sizes (one per spatial mode)")
            self.head = TensorRegression(c_in, num_outputs, grid, trl_rank, **factory)

    def features(self, x):
        return self.layers(self.stem(x))

    def forward(self, x):
        return self.head(self.features(x))


def hocp_resnet18(
    in_channels: int,
    num_outputs: int,
    *,
    n_spatial: int = 2,
    rank: Any = "same",
    head: str = "trl",
    stem: str = "imagenet",
    **kwargs,
) -> HOCPResNet:
    """ResNet-18 with every convolution an HO-CP convolution (paper sec. 5, eq. 7).

    Each 3x3 (and the 7x7 stem) conv is an :class:`HOCPBlock`: 1x1 (C -> R), Psi = BatchNorm +
    ReLU over the R channels, one depthwise 1-D conv per mode, lambda, 1x1 (R -> T); the skip
    projections are CP 1x1 convs. Stages, strides and skips are ResNet-18's. With
    ``rank="same"`` every conv has the parameters of its dense counterpart (~11 M in all, as
    the paper); an int or a fraction chooses otherwise.

    Parameters
    ----------
    in_channels, num_outputs : int
    n_spatial : int
        Spatial modes (2: images, 3: videos, any N with ``stem="small"``).
    rank : int, float or "same"
        Per conv, as :class:`KruskalConv`'s ``rank``.
    head : "trl" or "linear"
        ``"trl"``: a :class:`TensorRegression` on the last activation (averaged to a 2-per-mode
        grid, ``trl_grid=``, rank ``trl_rank=16``); ``"linear"``: global average pooling +
        ``nn.Linear``. Both keep working after ``tensorconv.nn.transduct``.
    stem : "imagenet" or "small"
        ``"imagenet"``: 7x7 stride-2 conv + 3x3 stride-2 max pool (1-3 modes); ``"small"``:
        one 3x3 stride-1 conv (small images, any N).
    **kwargs
        ``blocks=(2, 2, 2, 2)``, ``width=1.0`` (channel multiplier, for small experiments),
        ``trl_grid``, ``trl_rank``, ``device``, ``dtype``.

    Examples
    --------
    >>> import torch
    >>> from tensorconv.nn import hocp_resnet18, transduct
    >>> net = hocp_resnet18(3, 2, head="linear")
    >>> round(sum(p.numel() for p in net.parameters()) / 1e6, 1)
    11.2
    >>> net = hocp_resnet18(1, 2, stem="small", width=0.125).eval()
    >>> net(torch.randn(2, 1, 16, 16)).shape
    torch.Size([2, 2])
    >>> video = transduct(net, 3, init="center")       # every HO-CP conv, norm, pool and the head
    >>> video(torch.randn(2, 1, 5, 16, 16)).shape
    torch.Size([2, 2])
    """
    return HOCPResNet(in_channels, num_outputs, n_spatial=n_spatial, rank=rank, head=head, stem=stem, **kwargs)
