"""Compress a whole network: ``factorize`` replaces its convolutions by factorized ones,
``summarize`` reports what that did (parameters, fit, multiply-adds)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .layers import KruskalConv, TuckerConv, _FactorizedConv

__all__ = ["factorize", "summarize"]

FACTORIZATIONS = {"cp": KruskalConv, "tucker": TuckerConv}


def _check_rank(rank):
    if callable(rank) and not isinstance(rank, (str, int, float)):
        return
    if isinstance(rank, str):
        if rank != "same":
            raise ValueError(
                f"rank={rank!r}: expected an int >= 1, a float fraction > 0, 'same' or a callable "
                f"(name, module) -> rank"
            )
        return
    if isinstance(rank, bool) or not isinstance(rank, (int, float, tuple, list)):
        raise TypeError(f"rank={rank!r}: expected an int >= 1, a float fraction > 0, 'same' or a callable")
    values = rank if isinstance(rank, (tuple, list)) else (rank,)
    for v in values:
        if isinstance(v, bool) or (isinstance(v, int) and v < 1) or (isinstance(v, float) and not 0 < v < math.inf):
            raise ValueError(f"rank={rank!r}: an int rank must be >= 1 and a fraction > 0 and finite")


def _eligible(module):
    """A plain-typed torch conv (subclasses included) with a kernel larger than 1 in some mode."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and max(module.kernel_size) > 1


def factorize(
    model: nn.Module,
    rank: Any,
    *,
    factorization: str = "cp",
    layers: Callable[[str, nn.Module], bool] | None = None,
    inplace: bool = False,
    **decomposition_kwargs,
) -> nn.Module:
    """Replace every eligible convolution of ``model`` by a factorized one (``from_conv``).

    Eligible: an ``nn.Conv1d/2d/3d`` whose kernel is larger than 1 in some mode (a 1x1 conv is
    already a matrix product). Stride, padding (``"same"`` and asymmetric included),
    padding_mode, dilation, bias, device and dtype are kept; Tucker keeps ``groups`` too.

    Parameters
    ----------
    model : nn.Module
    rank : int, float, "same" or callable
        Per layer, as ``KruskalConv``/``TuckerConv``'s ``rank`` (a float is a fraction of that
        layer's dense parameters), or ``rank(name, module)`` returning one of those.
    factorization : "cp" or "tucker"
    layers : callable, optional
        ``layers(name, module) -> bool`` chooses among the eligible convs (default: all).
    inplace : bool
        Replace the layers of ``model`` itself; by default a deep copy is changed and ``model``
        is left untouched.
    **decomposition_kwargs
        Passed to ``from_conv`` (e.g. ``n_iter_max=``, ``init=``).

    Returns
    -------
    nn.Module
        The factorized model. Convs that cannot be converted exactly are left dense and named
        in one warning with the reason: a CP factorization of a grouped conv (a CP kernel mixes
        all channels: use ``factorization="tucker"``), and subclasses of ``nn.ConvNd`` with their
        own ``forward`` (timm's ``Conv2dSame``), whose attributes do not say what they compute.

    Raises
    ------
    ValueError
        An unknown ``factorization``, a bad ``rank``, or a model with no eligible convolution.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorconv.nn import factorize, summarize
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2))
    >>> small = factorize(net, 0.5, n_iter_max=20)
    >>> type(small[0]).__name__, type(net[0]).__name__        # the original is untouched
    ('KruskalConv', 'Conv2d')
    >>> small(torch.randn(1, 3, 16, 16)).shape
    torch.Size([1, 32, 7, 7])
    """
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization={factorization!r} is not one of {tuple(FACTORIZATIONS)}")
    _check_rank(rank)
    if layers is not None and not callable(layers):
        raise TypeError(f"layers must be a callable (name, module) -> bool, got {type(layers).__name__}")
    cls = FACTORIZATIONS[factorization]
    target = model if inplace else copy.deepcopy(model)
    if _eligible(target):
        raise ValueError("factorize: the model is itself one conv; use KruskalConv.from_conv / TuckerConv.from_conv")
    from .._conv_modules import check_plain_conv

    candidates = [
        (f"{parent}.{child}" if parent else child, module, child, conv)
        for parent, module in target.named_modules()
        for child, conv in module.named_children()
        if _eligible(conv)
    ]
    chosen = [c for c in candidates if layers is None or layers(c[0], c[3])]
    if not chosen:
        what = "no conv with a kernel larger than 1" if not candidates else "none chosen by `layers`"
        raise ValueError(
            f"factorize: the model has no eligible convolution ({what}; eligible: nn.Conv1d/2d/3d "
            f"with kernel_size > 1 in some mode)"
        )
    skipped = {}
    replaced = 0
    for name, parent, child, conv in chosen:
        try:
            check_plain_conv(conv, "factorize")
        except TypeError as exc:
            skipped[name] = str(exc).split(";")[0]
            continue
        if factorization == "cp" and conv.groups != 1:
            skipped[name] = f"groups={conv.groups}: a CP kernel mixes all channels; factorization='tucker' keeps groups"
            continue
        layer_rank = rank(name, conv) if callable(rank) and not isinstance(rank, str) else rank
        _check_rank(layer_rank)
        with torch.no_grad():
            setattr(parent, child, cls.from_conv(conv, layer_rank, **decomposition_kwargs))
        replaced += 1
    if skipped:
        lines = "\n".join(f"  {n}: {why}" for n, why in skipped.items())
        warnings.warn(f"factorize left {len(skipped)} conv(s) dense:\n{lines}", stacklevel=2)
    if not replaced:
        raise ValueError(f"factorize: no convolution could be factorized; left dense: {skipped}")
    return target


def _input_shapes(model, input_shape):
    """Each factorized layer's input shape, from one forward pass of zeros (hooks, eval mode)."""
    shapes = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the inputs go on unchanged

        return hook

    hooks = [
        m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if isinstance(m, _FactorizedConv)
    ]
    p = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _fmt(n):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def summarize(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> str:
    """A table of the factorized layers of ``model``: name, kernel shape, rank, parameters
    (dense -> factorized), relative reconstruction error (layers made by ``from_conv`` /
    :func:`factorize`), and with ``input_shape`` (batch included) the multiply-adds of the dense
    conv and of the plan each layer runs; then the totals.

    Examples
    --------
    >>> import torch
    >>> from tensorconv.nn import KruskalConv, summarize
    >>> net = torch.nn.Sequential(KruskalConv(3, 8, (3, 3), rank=4, padding=1))
    >>> print(summarize(net, (1, 3, 8, 8)))  # doctest: +NORMALIZE_WHITESPACE
    layer  kernel (T, C, *K)  rank  params dense -> factorized  rel. error  MACs dense -> plan
    0      (8, 3, 3, 3)       4     216 -> 72 (3.0x fewer)      -           13.82k -> 4.35k
    total                           216 -> 72 (3.0x fewer)                  13.82k -> 4.35k
    """
    rows = [(name, m) for name, m in model.named_modules() if isinstance(m, _FactorizedConv)]
    if not rows:
        raise ValueError("summarize: the model has no factorized layer (KruskalConv / TuckerConv); see factorize()")
    shapes = _input_shapes(model, input_shape) if input_shape is not None else {}
    table = [("layer", "kernel (T, C, *K)", "rank", "params dense -> factorized", "rel. error", "MACs dense -> plan")]
    tot_dense = tot_fact = mac_dense = mac_plan = 0
    for name, m in rows:
        dense, fact = m.dense_params, m.n_params
        tot_dense += dense
        tot_fact += fact
        ratio = f"{dense / fact:.1f}x fewer" if fact <= dense else f"{fact / dense:.1f}x more"
        err = getattr(m, "relative_error", None)
        macs = "-"
        if name in shapes:
            plan = m.plan(shapes[name])
            # a TuckerConv with groups > 1 replaces a grouped conv (KruskalConv.groups is 1)
            dense_macs = plan.dense_macs // m.groups
            mac_dense += dense_macs
            mac_plan += plan.macs
            macs = f"{_fmt(dense_macs)} -> {_fmt(plan.macs)}"
        rank = m.rank if isinstance(m.rank, int) else "x".join(str(r) for r in m.rank)
        table.append(
            (
                name,
                str((m.out_channels, m.in_channels) + tuple(m.kernel_size)),
                str(rank),
                f"{_fmt(dense)} -> {_fmt(fact)} ({ratio})",
                "-" if err is None else f"{err:.3g}",
                macs,
            )
        )
    ratio = f"{tot_dense / tot_fact:.1f}x fewer" if tot_fact <= tot_dense else f"{tot_fact / tot_dense:.1f}x more"
    table.append(
        (
            "total",
            "",
            "",
            f"{_fmt(tot_dense)} -> {_fmt(tot_fact)} ({ratio})",
            "",
            f"{_fmt(mac_dense)} -> {_fmt(mac_plan)}" if shapes else "-",
        )
    )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)
