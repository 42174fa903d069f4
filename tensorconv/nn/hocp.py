"""The paper's higher-order CP block (eq. 7) and the channel norm of its Psi."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._typing import IntOrTuple, Padding, Rank
from ._forward import layer_conv
from .layers import KruskalConv, _shrink_parameter

__all__ = ["HOCPBlock", "ChannelNorm"]


class HOCPBlock(nn.Module):
    """The paper's higher-order CP block (eq. 7): 1x1 (C->R) -> Psi -> depthwise 1-D per mode ->
    lambda -> 1x1 (R->T), with an optional skip ``F' = X + F x_1 U_S`` (U_S: T -> C channels).

    ``nonlinearity``: a module applied after the first 1x1 (default BatchNorm over the R
    channels + ReLU; ``None`` for none, which makes the block exactly a :class:`KruskalConv`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Padding = "same",
        dilation: IntOrTuple = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        rank: Rank | tuple[int, ...] = "same",
        strategy: str = "auto",
        n_spatial: int | None = None,
        nonlinearity: Any = "default",
        skip: bool = False,
    ) -> None:
        super().__init__()
        self.conv = KruskalConv(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            1,
            bias,
            padding_mode,
            device,
            dtype,
            rank=rank,
            strategy=strategy,
            n_spatial=n_spatial,
        )
        r = self.conv.rank
        if nonlinearity == "default":
            nonlinearity = _ChannelNormReLU(r, device=device, dtype=dtype)
        self.psi = nonlinearity if nonlinearity is not None else nn.Identity()
        if skip:
            if any(s != 1 for s in self.conv.stride):
                raise ValueError(f"skip=True needs stride 1 so the output matches the input, got {self.conv.stride}")
            self.skip_factor = nn.Parameter(torch.empty(in_channels, out_channels, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(self.skip_factor, a=math.sqrt(5))
        else:
            self.register_parameter("skip_factor", None)

    @property
    def weights(self):
        return self.conv.weights

    def prune(self, threshold=None, *, relative=None, optimizer=None):
        """:meth:`KruskalConv.prune` of the block's conv, and Psi's per-channel state (a norm over
        the R channels) cut to the same components; returns the number kept."""
        keep = self.conv._components_to_keep(threshold, relative)
        self.conv._keep_components(keep, optimizer)
        rank = self.conv.rank
        if isinstance(self.psi, ChannelNorm):
            self.psi.keep_channels(keep, optimizer)
        return rank

    def forward(self, x):
        layer = self.conv
        u_c = layer.factors[1]
        # x ×_1 U_C^T: C -> R channels, laid out channels-first (Psi's norm would copy it there anyway)
        h = torch.movedim(torch.movedim(x, 1, -1) @ u_c, -1, 1).contiguous()
        h = self.psi(h)
        rest = layer._kernel([layer.factors[0], None, *layer.factors[2:]])  # U_C applied above
        out = layer_conv(layer, h, rest)
        if self.skip_factor is not None:
            out = x + torch.movedim(torch.movedim(out, 1, -1) @ self.skip_factor.T, -1, 1)
        return out


class ChannelNorm(nn.Module):
    """BatchNorm over channel dim 1 of (B, C, *spatial) for any number of spatial dims (a
    (B, C, prod spatial) view through ``nn.BatchNorm1d``), so transduction needs no new module."""

    works_for_any_n = True  # tensorconv.nn.transduct leaves it as it is

    def __init__(self, channels, device=None, dtype=None):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels, device=device, dtype=dtype)

    def forward(self, x):
        shape = x.shape
        return self.norm(x.reshape(shape[0], shape[1], -1)).reshape(shape)

    def keep_channels(self, keep, optimizer=None):
        """Keep channels ``keep`` (indices) of the affine parameters (same Parameter objects, and
        the optimizer's state with them) and of the running statistics."""
        norm = self.norm
        with torch.no_grad():
            for p in (norm.weight, norm.bias):
                if p is not None:
                    _shrink_parameter(p, 0, keep, optimizer)
            for name in ("running_mean", "running_var"):
                buf = getattr(norm, name)
                if buf is not None:
                    setattr(norm, name, buf.index_select(0, keep).clone())
        norm.num_features = int(keep.numel())


class _ChannelNormReLU(ChannelNorm):
    """Psi of the HO-CP block: :class:`ChannelNorm`, then ReLU."""

    def forward(self, x):
        return torch.relu(super().forward(x))
