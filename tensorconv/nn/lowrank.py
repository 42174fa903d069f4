"""Low-rank (truncated SVD) layers for the layers without a spatial kernel: a 1x1 convolution or
a ``nn.Linear`` ``W (T, C)`` becomes two thin ones, ``W ~ U_r S_r V_r^T`` as ``C -> r -> T``
(a Tucker kernel without spatial modes, whose core is folded into the factors). Both halves are
plain ``nn.ConvNd`` / ``nn.Linear`` modules: exported, compiled and trained like any others.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import is_integral

__all__ = ["LowRankConv", "LowRankLinear", "svd_rank_for"]


def svd_rank_for(rank, in_features: int, out_features: int) -> int:
    """An int rank as given, or a float: the fraction of the dense ``out x in`` parameters that
    the two thin layers hold (``r (in + out)``), at least 1."""
    if isinstance(rank, bool) or not (is_integral(rank) or isinstance(rank, float)):
        raise TypeError(f"rank={rank!r}: expected an int >= 1 or a float fraction of the dense parameters")
    if is_integral(rank):
        r = int(rank)
        if r < 1:
            raise ValueError(f"rank={rank!r}: an int rank must be >= 1")
        return r
    if not 0 < rank < math.inf:
        raise ValueError(f"rank={rank!r}: a fraction must be > 0 and finite")
    return max(1, int(rank * in_features * out_features / (in_features + out_features)))


def _thin_factors(weight, rank):
    """(first (r, C), second (T, r), relative error) of the truncated SVD of ``weight`` (T, C),
    computed in float64 (float32 where the device has none), returned in the weight's dtype."""
    work = torch.float64 if weight.device.type != "mps" else torch.float32
    w = weight.detach().to(work)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    second = u[:, :rank] * root[None, :]
    total = float(s.square().sum())
    error = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    return first.to(weight.dtype), second.to(weight.dtype), error


class _LowRank(nn.Module):
    """What both low-rank layers share: two thin modules ``first`` (C -> r) and ``second`` (r -> T)."""

    #: relative Frobenius error of the truncated SVD (set by ``from_*``; None for a fresh layer)
    relative_error = None

    def forward(self, x):
        return self.second(self.first(x))

    @property
    def bias(self):
        """The bias (the second layer's), as the dense layer's ``bias``."""
        return self.second.bias

    @property
    def rank(self) -> int:
        return self.first.weight.shape[0]

    @property
    def n_params(self) -> int:
        """Parameters of the two thin weights (the bias not counted, as for the other layers)."""
        return self.first.weight.numel() + self.second.weight.numel()

    @property
    def kernel_shape(self) -> tuple:
        """(T, C, 1, ...): the shape of the dense weight this layer stands for."""
        w1, w2 = self.first.weight, self.second.weight
        return (w2.shape[0], w1.shape[1]) + tuple(w1.shape[2:])

    @property
    def dense_params(self) -> int:
        """Parameters of the dense layer's weight this one stands for."""
        return self.second.weight.shape[0] * self.first.weight.shape[1]

    def _fill(self, weight, bias):
        first, second, error = _thin_factors(weight, self.rank)
        with torch.no_grad():
            self.first.weight.copy_(first.reshape(self.first.weight.shape))
            self.second.weight.copy_(second.reshape(self.second.weight.shape))
            if bias is not None:
                self.second.bias.copy_(bias)
        self.relative_error = error
        return self


class LowRankLinear(_LowRank):
    """``nn.Linear(in_features, out_features)`` as two: ``in -> rank`` (no bias) and ``rank -> out``.

    Examples
    --------
    >>> import torch
    >>> dense = torch.nn.Linear(64, 32)
    >>> thin = LowRankLinear.from_linear(dense, 8)
    >>> thin.n_params, dense.weight.numel()
    (768, 2048)
    >>> thin(torch.randn(5, 64)).shape
    torch.Size([5, 32])
    """

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        r = svd_rank_for(rank, in_features, out_features)
        factory = dict(device=device, dtype=dtype)
        self.first = nn.Linear(in_features, r, bias=False, **factory)
        self.second = nn.Linear(r, out_features, bias=bias, **factory)

    @classmethod
    def skeleton(cls, linear: nn.Linear, rank, device=None) -> LowRankLinear:
        """The layer :meth:`from_linear` fills, freshly initialised (``device="meta"``: no memory)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"LowRankLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        return cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=device or w.device,
            dtype=w.dtype,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank) -> LowRankLinear:
        """The best rank-``rank`` approximation of ``linear`` (truncated SVD; ``relative_error``
        holds its relative Frobenius error). A float ``rank`` is a fraction of its parameters."""
        return cls.skeleton(linear, rank)._fill(linear.weight, linear.bias)

    def extra_repr(self):
        return f"{self.first.in_features} -> {self.rank} -> {self.second.out_features}"


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class LowRankConv(_LowRank):
    """A 1x1 ``nn.ConvNd`` (N = 1..3) as two: ``C -> rank`` (with the conv's stride, padding and
    padding_mode; no bias) and ``rank -> T`` (1x1, the bias). Dilation does not act on a 1x1 kernel."""

    def __init__(
        self,
        in_channels,
        out_channels,
        n_spatial,
        rank,
        stride=1,
        padding=0,
        padding_mode="zeros",
        bias=True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if n_spatial not in _CONVS:
            raise ValueError(f"n_spatial={n_spatial!r} is not one of {tuple(_CONVS)}")
        conv = _CONVS[n_spatial]
        r = svd_rank_for(rank, in_channels, out_channels)
        factory = dict(device=device, dtype=dtype)
        self.first = conv(
            in_channels, r, 1, stride=stride, padding=padding, padding_mode=padding_mode, bias=False, **factory
        )
        self.second = conv(r, out_channels, 1, bias=bias, **factory)

    @classmethod
    def skeleton(cls, conv: nn.Module, rank, device=None) -> LowRankConv:
        """The layer :meth:`from_conv` fills, freshly initialised (``device="meta"``: no memory)."""
        from .._conv_modules import check_plain_conv

        check_plain_conv(conv, "LowRankConv.from_conv")
        if any(k != 1 for k in conv.kernel_size):
            raise ValueError(
                f"LowRankConv.from_conv: kernel_size={conv.kernel_size}: only 1x1 convs; use "
                f"KruskalConv / TuckerConv.from_conv for a spatial kernel"
            )
        if conv.groups != 1:
            raise ValueError(
                f"LowRankConv.from_conv: groups={conv.groups}: only groups=1 (a grouped 1x1 is already thin)"
            )
        w = conv.weight
        return cls(
            conv.in_channels,
            conv.out_channels,
            len(conv.kernel_size),
            rank,
            stride=conv.stride,
            padding=conv.padding,
            padding_mode=conv.padding_mode,
            bias=conv.bias is not None,
            device=device or w.device,
            dtype=w.dtype,
        )

    @classmethod
    def from_conv(cls, conv: nn.Module, rank) -> LowRankConv:
        """The best rank-``rank`` approximation of a 1x1 conv (truncated SVD of its (T, C) weight;
        ``relative_error`` holds its relative Frobenius error)."""
        layer = cls.skeleton(conv, rank)
        return layer._fill(conv.weight.reshape(conv.out_channels, conv.in_channels), conv.bias)

    def extra_repr(self):
        return f"{self.first.in_channels} -> {self.rank} -> {self.second.out_channels}, stride={self.first.stride}"
