"""PyTorch modules over the backend-neutral plans: KruskalConv, TuckerConv (HOCPBlock: hocp.py).

Arguments and defaults follow ``torch.nn.ConvNd``. The number of spatial dims is
``len(kernel_size)`` (or ``n_spatial=`` with an int kernel size), so the same class is a
1-D ... N-D convolution.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._typing import IntOrTuple, Padding, Rank
from ..backends import PADDING_MODES
from ..kernels import KruskalKernel, TuckerKernel
from ..plans.plan import plan_conv
from ..plans.spec import normalize_int_tuple, normalize_padding
from ._forward import TORCH as _TORCH
from ._forward import layer_conv
from .ranks import _kernel_size, cp_rank_for, tucker_rank_for

__all__ = ["KruskalConv", "TuckerConv", "cp_rank_for", "tucker_rank_for"]


def _conv_padding(pairs):
    """(low, high) pairs as ``nn.ConvNd`` says its padding: one int per spatial dim; a dim padded
    unevenly (which nn.ConvNd cannot) keeps its (low, high) pair."""
    return tuple(lo if lo == hi else (lo, hi) for lo, hi in pairs)


def _compression(dense, stored):
    """'dense N, 3.9x fewer' or 'dense N, 8.1x more': the parameter count said as it is."""
    if stored <= dense:
        return f"dense {dense}, {dense / stored:.1f}x fewer"
    return f"dense {dense}, {stored / dense:.1f}x more"


class _FactorizedConv(nn.Module):
    """Geometry, bias and forward shared by the factorized layers."""

    groups = 1  # as nn.ConvNd's; TuckerConv may set more

    def _init_geometry(
        self, in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode, strategy, n_spatial
    ):
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.kernel_size = _kernel_size(kernel_size, n_spatial)
        n = len(self.kernel_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = normalize_int_tuple(stride, n, "stride", minimum=1)
        self.dilation = normalize_int_tuple(dilation, n, "dilation", minimum=1)
        # validated like any convolution's; "same" / "valid" are kept as given (they follow transduct)
        pairs = normalize_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.padding = padding if isinstance(padding, str) else _conv_padding(pairs)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r} is not one of {PADDING_MODES}")
        self.padding_mode = padding_mode
        from ..plans.planner import STRATEGIES

        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
        self.strategy = strategy

    @property
    def n_spatial(self):
        return len(self.kernel_size)

    def _init_bias(self, bias, fan_in, factory):
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
            bound = 1 / math.sqrt(fan_in)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        n = self.n_spatial
        if x.ndim not in (n + 1, n + 2):
            raise ValueError(
                f"{type(self).__name__} with {n} spatial dims expects input (B, C, *{n} dims) or "
                f"(C, *{n} dims), got shape {tuple(x.shape)}"
            )
        return layer_conv(self, x, self._kernel())

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: say why it cannot work
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script: its forward plans the "
            f"convolution in Python for each input shape. Use torch.jit.trace or torch.export "
            f"(tensorconv layers record shape-generic standard convs), torch.compile, or "
            f"to_dense_conv() for a scriptable nn.ConvNd"
        )

    def plan(self, input_shape):
        """The :class:`~tensorconv.ConvPlan` this layer runs for ``input_shape``."""

        p = next(self.parameters())
        return plan_conv(
            self.kernel, input_shape, **self._conv_arguments(), dtype=p.dtype, backend="torch", device=p.device
        )

    def _conv_arguments(self):
        """The keywords of ``conv()`` / ``plan_conv()`` that this layer fixes."""
        return dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
            strategy=self.strategy,
        )

    @property
    def dense_params(self):
        return self.in_channels * self.out_channels * math.prod(self.kernel_size)

    @property
    def n_params(self):
        return sum(p.numel() for p in self.parameters() if p is not self.bias)

    def _geometry_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if any(v != 1 for v in self.stride):
            s += f", stride={self.stride}"
        if self.padding != (0,) * self.n_spatial:
            s += f", padding={self.padding!r}"
        if any(v != 1 for v in self.dilation):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.bias is None:
            s += ", bias=False"
        return s

    def to_dense_conv(self):
        """An equivalent ``nn.Conv{1,2,3}d`` (N <= 3, symmetric padding)."""
        n = self.n_spatial
        if n > 3:
            raise ValueError(f"to_dense_conv: torch has no nn.Conv{n}d; use tensorconv.conv with kernel.to_dense()")
        padding = self.padding
        if not isinstance(padding, str) and any(isinstance(p, tuple) for p in padding):
            raise ValueError(f"to_dense_conv: nn.Conv{n}d has no asymmetric padding, this layer has {padding}")
        p = next(self.parameters())
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
        dense = cls(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=p.device,
            dtype=p.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self._dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def _dense_weight(self):
        return self.kernel.to_dense()

    @staticmethod
    def _conv_geometry(conv_module, device=None):
        """The constructor arguments that copy ``conv_module``'s geometry, bias flag, dtype and
        device (or ``device``)."""
        from .._conv_modules import check_plain_conv

        check_plain_conv(conv_module, "from_conv")
        padding = conv_module.padding if isinstance(conv_module.padding, str) else tuple(conv_module.padding)
        return dict(
            stride=tuple(conv_module.stride),
            padding=padding,
            dilation=tuple(conv_module.dilation),
            padding_mode=conv_module.padding_mode,
            bias=conv_module.bias is not None,
            device=conv_module.weight.device if device is None else device,
            dtype=conv_module.weight.dtype,
        )


class KruskalConv(_FactorizedConv):
    """A convolution with a CP kernel ``[[lambda; U_T, U_C, U_K0, ..]]`` (paper eq. 6), any N.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode,
    device, dtype : as ``torch.nn.ConvNd``
    rank : int, float or "same"
        A float is a fraction of the dense conv's parameter count; "same" matches it (the paper).
    strategy : "auto", "factorized", "reconstructed" or "fused"
        How :func:`~tensorconv.plans.plan_conv` runs it (``"auto"``: the cheapest by the cost
        model, including a ready compiled accelerator).
    n_spatial : int, needed when ``kernel_size`` is an int.

    Examples
    --------
    >>> import torch
    >>> layer = KruskalConv(16, 32, (3, 3, 3, 3), rank=8, padding=1)
    >>> layer(torch.randn(2, 16, 5, 6, 7, 8)).shape
    torch.Size([2, 32, 5, 6, 7, 8])
    """

    kernel_class = KruskalKernel  # what from_conv decomposes into

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Padding = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        rank: Rank | tuple[int, ...] = "same",
        strategy: str = "auto",
        n_spatial: int | None = None,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(
                f"KruskalConv: groups={groups!r} is not supported (a CP kernel mixes all channels); "
                f"TuckerConv(..., groups={groups!r}) factorizes each group"
            )
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode, strategy, n_spatial
        )
        self.rank = cp_rank_for(rank, in_channels, out_channels, self.kernel_size)
        factory = {"device": device, "dtype": dtype}
        dims = (out_channels, in_channels) + self.kernel_size
        self.weights = nn.Parameter(torch.empty(self.rank, **factory))
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(d, self.rank, **factory)) for d in dims])
        self.reset_parameters()
        self._init_bias(bias, in_channels * math.prod(self.kernel_size), factory)

    def reset_parameters(self):
        """Gaussian factors and unit lambda, scaled so the reconstructed kernel has the variance of
        torch's default conv init (kaiming_uniform(a=sqrt(5)): Var = 1 / (3 fan_in))."""
        fan_in = self.in_channels * math.prod(self.kernel_size)
        target = 1.0 / (3.0 * fan_in)
        n_factors = len(self.factors)
        std = (target / self.rank) ** (1.0 / (2 * n_factors))
        with torch.no_grad():
            self.weights.fill_(1.0)
            for f in self.factors:
                f.normal_(0.0, std)

    @property
    def kernel(self) -> KruskalKernel:
        """The CP kernel, built from the live parameters (autograd flows through it)."""
        return KruskalKernel(self.weights, list(self.factors))

    def _kernel(self, factors=None):
        """:attr:`kernel` as forward builds it: from the shapes the layer keeps, not read from the
        parameters (a tracer records every read); ``factors`` replaces the layer's (HOCPBlock's)."""
        factors = list(self.factors) if factors is None else factors
        shape = (self.out_channels, self.in_channels) + tuple(self.kernel_size)
        if factors[1] is None:
            shape = (self.out_channels, self.rank) + tuple(self.kernel_size)
        return KruskalKernel._of_layer(_TORCH, self.weights, factors, shape, self.rank)

    def extra_repr(self):
        return (
            f"{self._geometry_repr()}, rank={self.rank}, params={self.n_params} "
            f"({_compression(self.dense_params, self.n_params)})"
        )

    @classmethod
    def from_conv(
        cls, conv_module: nn.Module, rank: Rank | tuple[int, ...], strategy: str = "auto", **decomposition_kwargs
    ):
        """CP-decompose a trained ``nn.ConvNd`` on its device and dtype (:func:`KruskalKernel.from_dense`:
        tensorconv's own ALS by default; float16 / bfloat16 weights are decomposed in float32).

        Stride, padding, dilation, padding_mode and bias are kept; ``relative_error`` holds the
        decomposition's relative reconstruction error. ``decomposition_kwargs`` go to
        ``from_dense`` (``n_iter_max=``, ``tol=``, ``init=``, ``random_state=``, ``method=``).
        """
        layer = cls.skeleton(conv_module, rank, strategy)
        weight = conv_module.weight.detach()
        kernel = KruskalKernel.from_dense(weight, layer.rank, **decomposition_kwargs)
        with torch.no_grad():
            layer.weights.copy_(kernel.weights)
            for p, f in zip(layer.factors, kernel.factors):
                p.copy_(f)
            if layer.bias is not None:
                layer.bias.copy_(conv_module.bias)
        layer.relative_error = kernel.relative_error(weight)
        return layer

    @classmethod
    def skeleton(cls, conv_module: nn.Module, rank: Rank | tuple[int, ...], strategy: str = "auto", device=None):
        """The layer :meth:`from_conv` fills, freshly initialised, without decomposing: the conv's
        geometry, bias flag, dtype and device (or ``device``, e.g. ``"meta"`` to count parameters
        for free), at the rank ``rank`` resolves to. Load a compressed model's checkpoint into it."""
        geo = cls._conv_geometry(conv_module, device)
        if conv_module.groups != 1:
            raise ValueError(
                f"KruskalConv.from_conv: groups={conv_module.groups} is not supported (a CP kernel mixes "
                f"all channels); use TuckerConv.from_conv, which keeps groups"
            )
        ks = tuple(conv_module.weight.shape[2:])
        rank = cp_rank_for(rank, conv_module.in_channels, conv_module.out_channels, ks)
        return cls(conv_module.in_channels, conv_module.out_channels, ks, rank=rank, strategy=strategy, **geo)

    # -- transduction (paper sec. 4, eq. 8) ---------------------------------------------------------------
    def transduct(self, kernel_size, position=0, padding="same", stride=1, dilation=1, init="ones", freeze=True):
        """Add a spatial mode in place: an N-D layer becomes (N+1)-D.

        The new factor (kernel_size x R) has the dtype and device of the others. With
        ``freeze=True`` only it trains until :meth:`unfreeze`. Build the optimizer after this
        call (the parameter list changed). Returns ``self``.
        """
        new_kernel = self.kernel.transduct(kernel_size, position, init)
        n = self.n_spatial
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride for the new mode must be an int >= 1, got {stride!r}")
        if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation for the new mode must be an int >= 1, got {dilation!r}")
        new_pad = normalize_padding(
            padding if isinstance(padding, str) else (padding,), (kernel_size,), (stride,), (dilation,)
        )[0]
        old_pairs = normalize_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        insert = lambda seq, v: tuple(seq[:position]) + (v,) + tuple(seq[position:])  # noqa: E731
        keep_same = self.padding == "same" and padding == "same"
        self.kernel_size = insert(self.kernel_size, kernel_size)
        self.stride = insert(self.stride, stride)
        self.dilation = insert(self.dilation, dilation)
        self.padding = "same" if keep_same else _conv_padding(insert(old_pairs, new_pad))
        factors = list(self.factors)
        factors.insert(2 + position, nn.Parameter(new_kernel.factors[2 + position].detach().clone()))
        self.factors = nn.ParameterList(factors)
        assert len(self.factors) == 2 + n + 1
        if freeze:
            new_factor = self.factors[2 + position]
            for p in self.parameters():
                if p is not new_factor:
                    p.requires_grad_(False)
        return self

    def unfreeze(self):
        """Let every parameter of the layer train again (after a frozen :meth:`transduct`)."""
        for p in self.parameters():
            p.requires_grad_(True)
        return self

    # -- rank selection (paper sec. 4) ------------------------------------------------------------------------
    def prune(self, threshold=None, *, relative=None, optimizer=None):
        """Drop rank components with small |lambda|; returns the number kept.

        ``threshold``: drop |lambda| <= threshold. ``relative``: drop |lambda| <= relative *
        max |lambda| of this layer (a per-layer cut: one global threshold can strip a layer whose
        lambdas are all small). Give one of them.

        The layer's Parameter objects are kept (their data shrinks in place), so an optimizer
        built before still updates them. Its per-parameter state (momentum, Adam's moments)
        has the old shape: pass ``optimizer=`` and that state is cut to the kept components
        too; without it, a stateful optimizer fails on its next step (SGD without momentum
        does not care).
        """
        self._keep_components(self._components_to_keep(threshold, relative), optimizer)
        return self.rank

    def _components_to_keep(self, threshold, relative):
        """Indices of the rank components with |lambda| above the cut (see :meth:`prune`)."""
        if (threshold is None) == (relative is None):
            raise ValueError(
                f"prune: give exactly one of threshold= and relative=, got threshold={threshold!r}, "
                f"relative={relative!r}"
            )
        magnitude = self.weights.detach().abs()
        if relative is not None:
            if not 0 <= relative < 1:
                raise ValueError(f"prune: relative={relative!r} must be in [0, 1) (a fraction of max |lambda|)")
            threshold = float(relative) * float(magnitude.max())
        elif not threshold >= 0:
            raise ValueError(f"prune: threshold={threshold!r} must be >= 0")
        keep = (magnitude > threshold).nonzero().flatten()
        if keep.numel() == 0:
            raise ValueError(
                f"prune(threshold={threshold:.3g}) would remove every rank component "
                f"(max |lambda| = {float(magnitude.max()):.3g})"
            )
        return keep

    def _keep_components(self, keep, optimizer=None):
        """Keep rank components ``keep`` (indices) of every factor and lambda."""
        with torch.no_grad():
            for p, dim in [(self.weights, 0)] + [(f, 1) for f in self.factors]:
                _shrink_parameter(p, dim, keep, optimizer)
        self.rank = int(keep.numel())


def _shrink_parameter(p, dim, keep, optimizer):
    """Keep entries ``keep`` of ``p`` along ``dim`` in place (same Parameter object), and the same
    entries of the optimizer's per-parameter state that has ``p``'s shape."""
    old_shape = p.shape
    if optimizer is not None:
        state = optimizer.state.get(p, {})
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.shape == old_shape:
                state[key] = value.index_select(dim, keep).clone()
    p.data = p.data.index_select(dim, keep).clone()
    if p.grad is not None:
        p.grad = p.grad.index_select(dim, keep).clone()


class TuckerConv(_FactorizedConv):
    """A convolution with a Tucker kernel: 1x1 (C->R_in) -> core conv -> 1x1 (R_out->T).

    ``rank=(R_out, R_in)`` (an int means both; a float or "same" a parameter budget).
    ``groups`` means what it means for ``nn.ConvNd``: a grouped conv, each of the ``groups``
    channel groups factorized on its own (block-diagonal factors stored by their blocks,
    ranks and parameter budget per group). ``core_groups > 1`` is ResNeXt's block instead:
    dense 1x1s around a core grouped ``core_groups`` ways (a conv that mixes all channels).
    """

    kernel_class = TuckerKernel  # what from_conv decomposes into

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Padding = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        rank: Rank | tuple[int, ...] = "same",
        strategy: str = "auto",
        core_groups: int = 1,
        n_spatial: int | None = None,
    ) -> None:
        super().__init__()
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode, strategy, n_spatial
        )
        for name, v in (("groups", groups), ("core_groups", core_groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if groups > 1 and core_groups > 1:
            raise ValueError(
                f"groups={groups} (a grouped conv) and core_groups={core_groups} (ResNeXt) exclude each other: give one"
            )
        self.groups = groups
        self.core_groups = core_groups
        self.rank = tucker_rank_for(
            rank, in_channels, out_channels, self.kernel_size, self._core_split, grouped_conv=groups > 1
        )
        factory = {"device": device, "dtype": dtype}
        r_out, r_in = self.rank
        cols = (r_out // groups, r_in // groups)  # block-diagonal factors are stored by their blocks
        self.core = nn.Parameter(torch.empty((r_out, r_in // self._core_split) + self.kernel_size, **factory))
        self.factors = nn.ParameterList(
            [
                nn.Parameter(torch.empty(out_channels, cols[0], **factory)),
                nn.Parameter(torch.empty(in_channels, cols[1], **factory)),
            ]
        )
        self.reset_parameters()
        self._init_bias(bias, in_channels // groups * math.prod(self.kernel_size), factory)

    def reset_parameters(self):
        """Gaussian core and factors, scaled so the kernel has the variance of torch's default
        conv init (Var = 1 / (3 fan_in), fan_in = C / groups * prod(K))."""
        fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
        target = 1.0 / (3.0 * fan_in)
        # W[t,s,k] sums R_out/groups * R_in/(core split) products of three entries (for a given t, s pair)
        terms = self.rank[0] // self.groups * (self.rank[1] // self._core_split)
        std = (target / terms) ** (1.0 / 6)
        with torch.no_grad():
            self.core.normal_(0.0, std)
            for f in self.factors:
                f.normal_(0.0, std)

    @property
    def _core_split(self):
        """How many groups the core is split into: ``groups`` (a grouped conv) or ``core_groups`` (ResNeXt)."""
        return max(self.groups, self.core_groups)

    @property
    def kernel(self) -> TuckerKernel:
        return TuckerKernel(self.core, list(self.factors), groups=self._core_split)

    def _kernel(self):
        """:attr:`kernel` as forward builds it: from the shapes the layer keeps, not read from the
        parameters (a tracer records every read)."""
        shape = (self.out_channels, self.in_channels) + tuple(self.kernel_size)
        block = (self.groups > 1,) * 2
        return TuckerKernel._of_layer(_TORCH, self.core, list(self.factors), self._core_split, shape, block)

    @property
    def dense_params(self):
        """Parameters of the conv this layer stands for (a grouped conv's if ``groups > 1``)."""
        return self.in_channels // self.groups * self.out_channels * math.prod(self.kernel_size)

    def extra_repr(self):
        g = f", groups={self.groups}" if self.groups > 1 else ""
        g += f", core_groups={self.core_groups}" if self.core_groups > 1 else ""
        return (
            f"{self._geometry_repr()}, rank={self.rank}{g}, params={self.n_params} "
            f"({_compression(self.dense_params, self.n_params)})"
        )

    def _dense_weight(self):
        k = self.kernel
        return k.to_grouped_dense() if self.groups > 1 else k.to_dense()

    @classmethod
    def from_conv(
        cls, conv_module: nn.Module, rank: Rank | tuple[int, ...], strategy: str = "auto", **decomposition_kwargs
    ):
        """Partial-Tucker-decompose a trained ``nn.ConvNd`` over its channel modes.

        A grouped conv (groups = G) is decomposed group by group into a layer with the same
        ``groups``: block-diagonal factors stored by their blocks, a grouped core, ranks and
        the ``rank`` budget per group; the output is exact up to the ranks.
        """
        layer = cls.skeleton(conv_module, rank, strategy)
        g = conv_module.groups
        weight = conv_module.weight.detach()
        t = conv_module.out_channels
        r_out, r_in = layer.rank
        tg, og, ig = t // g, r_out // g, r_in // g
        cores, u_t, u_c = [], [], []
        for j in range(g):
            part = TuckerKernel.from_dense(weight[j * tg : (j + 1) * tg], (og, ig), **decomposition_kwargs)
            cores.append(part.core)
            u_t.append(part.factors[0])
            u_c.append(part.factors[1])
        with torch.no_grad():
            layer.core.copy_(torch.cat(cores, 0))
            layer.factors[0].copy_(torch.cat(u_t, 0))
            layer.factors[1].copy_(torch.cat(u_c, 0))
            if layer.bias is not None:
                layer.bias.copy_(conv_module.bias)
        layer.relative_error = layer.kernel.relative_error(weight)  # the grouped conv's weight, if grouped
        return layer

    @classmethod
    def skeleton(cls, conv_module: nn.Module, rank: Rank | tuple[int, ...], strategy: str = "auto", device=None):
        """The layer :meth:`from_conv` fills, freshly initialised, without decomposing (see
        :meth:`KruskalConv.skeleton`); a grouped conv keeps its groups."""
        geo = cls._conv_geometry(conv_module, device)
        g = conv_module.groups
        t, c = conv_module.out_channels, conv_module.in_channels
        ks = tuple(conv_module.weight.shape[2:])
        r_out, r_in = tucker_rank_for(rank, c, t, ks, g, grouped_conv=True)
        if r_out > t or r_in > c:
            raise ValueError(f"rank=({r_out}, {r_in}) exceeds the conv's channels ({t}, {c})")
        return cls(c, t, ks, rank=(r_out, r_in), strategy=strategy, groups=g, **geo)
