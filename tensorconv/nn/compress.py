"""Compress a whole network: ``factorize`` replaces its convolutions by factorized ones,
``summarize`` reports what that did (parameters, fit, multiply-adds)."""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import is_integral
from ..kernels import check_decomposition_keywords
from ._observe import observe
from ._progress import steps
from .layers import KruskalConv, TuckerConv, _FactorizedConv
from .lowrank import LowRankConv, LowRankLinear, _LowRank

#: what summarize lists as compressed: the factorized convs and the low-rank (SVD) layers
_COMPRESSED = (_FactorizedConv, _LowRank)

__all__ = ["factorize", "summarize"]

FACTORIZATIONS = {"cp": KruskalConv, "tucker": TuckerConv}
#: what factorization="svd" replaces, and how it names them in an error
_SVD_LAYERS = "nn.Linear, or nn.Conv1d/2d/3d with a 1x1 kernel"


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
    if not (is_integral(rank) or isinstance(rank, (float, tuple, list))) or isinstance(rank, bool):
        raise TypeError(f"rank={rank!r}: expected an int >= 1, a float fraction > 0, 'same' or a callable")
    values = rank if isinstance(rank, (tuple, list)) else (rank,)
    for v in values:
        if is_integral(v):
            if operator.index(v) < 1:
                raise ValueError(f"rank={rank!r}: an int rank must be >= 1")
        elif not isinstance(v, float) or not 0 < v < math.inf:
            raise ValueError(f"rank={rank!r}: an int rank must be >= 1 and a fraction > 0 and finite")


def _eligible(module):
    """A plain-typed torch conv (subclasses included) with a kernel larger than 1 in some mode."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and max(module.kernel_size) > 1


def _svd_eligible(module):
    """What ``factorization="svd"`` replaces: a 1x1 conv, or an ``nn.Linear`` of exactly that type
    (a subclass, such as attention's output projection, is read through its owner, not called)."""
    if type(module) is nn.Linear:
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and max(module.kernel_size) == 1


def _low_rank(module, rank, *, decompose, device=None):
    """``module`` (a 1x1 conv or a linear layer) as two thin layers at ``rank`` ("same": as many
    parameters as the dense layer)."""
    rank = 1.0 if rank == "same" else rank
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_linear(module, rank) if decompose else LowRankLinear.skeleton(module, rank, device)
    return LowRankConv.from_conv(module, rank) if decompose else LowRankConv.skeleton(module, rank, device)


def factorize(
    model: nn.Module,
    rank: Any,
    *,
    factorization: str = "cp",
    layers: Callable[[str, nn.Module], bool] | None = None,
    inplace: bool = False,
    decompose: bool = True,
    progress: bool | None = None,
    **decomposition_kwargs,
) -> nn.Module:
    """Replace every eligible convolution of ``model`` by a factorized one (``from_conv``).

    Eligible: an ``nn.Conv1d/2d/3d`` whose kernel is larger than 1 in some mode (a 1x1 conv is
    already a matrix product). Stride, padding (``"same"`` and asymmetric included),
    padding_mode, dilation, bias, device and dtype are kept; Tucker keeps ``groups`` too. So is
    what the conv was besides its weights: ``requires_grad`` (a frozen conv stays frozen), the
    training flag, and its forward / backward hooks (shared with the new module; state-dict hooks
    cannot be, and are named in a warning). A conv used in several places (one module object)
    becomes one factorized module used in the same places: tied weights stay tied.

    Parameters
    ----------
    model : nn.Module
    rank : int, float, "same" or callable
        Per layer, as ``KruskalConv``/``TuckerConv``'s ``rank`` (a float is a fraction of that
        layer's dense parameters), or ``rank(name, module)`` returning one of those, or None to
        leave that layer dense.
    factorization : "cp", "tucker" or "svd"
        CP and Tucker replace the convs with a spatial kernel; ``"svd"`` replaces the 1x1 convs
        (groups=1) and ``nn.Linear`` layers by two thin layers (:class:`LowRankConv`,
        :class:`LowRankLinear`: a truncated SVD, exact and without iterations, so it takes no
        ``decomposition_kwargs``; an int rank or a float fraction of the layer's parameters).
    layers : callable, optional
        ``layers(name, module) -> bool`` chooses among the eligible convs (default: all).
    inplace : bool
        Replace the layers of ``model`` itself; by default a deep copy is changed and ``model``
        is left untouched.
    progress : bool, optional
        Show each layer as it is decomposed, with an estimate of the time left (tqdm where it is
        installed); default: only where stderr is a terminal.
    decompose : bool
        ``False``: build the factorized layers without decomposing (:meth:`KruskalConv.skeleton`:
        the same layers, ranks and left-dense convs, freshly initialised, in seconds), to load
        the ``state_dict`` of a model that ``factorize`` compressed with the same arguments.
    **decomposition_kwargs
        Passed to ``from_conv`` (e.g. ``n_iter_max=``, ``init=``); an unknown keyword is a
        ``TypeError`` naming the valid ones, raised before any layer is decomposed.

    Returns
    -------
    nn.Module
        The factorized model. Convs that are not converted are left dense and named in one
        warning with the reason: a CP factorization of a grouped conv (a CP kernel mixes all
        channels: use ``factorization="tucker"``); subclasses of ``nn.ConvNd`` with their own
        ``forward`` (timm's ``Conv2dSame``), whose attributes do not say what they compute; a rank
        that does not fit the layer (a tuple not divisible by its groups); and layers whose
        factorized form would not have fewer parameters than the dense conv at the asked rank
        (a depthwise conv at most ranks; ``"same"`` and fractions >= 1 ask for as many and are
        kept).

    Raises
    ------
    ValueError
        An unknown ``factorization``, a bad ``rank``, or a model with no eligible convolution.
    TypeError
        A keyword that the decomposition does not take.

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
    if factorization not in (*FACTORIZATIONS, "svd"):
        raise ValueError(f"factorization={factorization!r} is not one of {(*FACTORIZATIONS, 'svd')}")
    _check_rank(rank)
    if layers is not None and not callable(layers):
        raise TypeError(f"layers must be a callable (name, module) -> bool, got {type(layers).__name__}")
    svd = factorization == "svd"
    eligible = _svd_eligible if svd else _eligible
    if svd and decomposition_kwargs:
        raise TypeError(
            f"factorize(factorization='svd'): a truncated SVD takes no decomposition keywords, got "
            f"{sorted(decomposition_kwargs)}"
        )
    if not svd:
        check_decomposition_keywords(FACTORIZATIONS[factorization].kernel_class, decomposition_kwargs, "factorize")
    if eligible(model):
        raise ValueError(
            "factorize: the model is itself one layer; use "
            + (
                "LowRankConv.from_conv / LowRankLinear.from_linear"
                if svd
                else "KruskalConv.from_conv / TuckerConv.from_conv"
            )
        )
    target = model if inplace else copy.deepcopy(model)
    # every use of every eligible conv: named_children() lists a module once per parent, so a
    # conv used twice in one Sequential would keep its second use dense
    uses = [
        (f"{parent_name}.{child}" if parent_name else child, parent, child, conv)
        for parent_name, parent in target.named_modules()
        for child, conv in parent._modules.items()
        if conv is not None and eligible(conv)
    ]
    first_use = {}
    for name, _, _, conv in uses:
        first_use.setdefault(id(conv), (name, conv))
    chosen = [(name, conv) for name, conv in first_use.values() if layers is None or layers(name, conv)]
    if not chosen:
        kinds = _SVD_LAYERS if svd else "nn.Conv1d/2d/3d with kernel_size > 1 in some mode"
        what = "none of them" if not uses else "none chosen by `layers`"
        raise ValueError(
            f"factorize: the model has no eligible layer for factorization={factorization!r} "
            f"({what}; eligible: {kinds})"
        )
    skipped, replacements = {}, {}
    for name, conv in steps(chosen, what="factorize", progress=progress and decompose, name=lambda c: c[0]):
        layer_rank = rank(name, conv) if callable(rank) and not isinstance(rank, str) else rank
        if layer_rank is None:  # the callable keeps this layer dense
            continue
        _check_rank(layer_rank)
        reason = _why_not(conv, layer_rank, factorization)
        if reason is not None:
            skipped[name] = reason
            continue
        with torch.no_grad():
            if svd:
                layer = _low_rank(conv, layer_rank, decompose=decompose)
            elif decompose:
                layer = FACTORIZATIONS[factorization].from_conv(conv, layer_rank, **decomposition_kwargs)
            else:
                layer = FACTORIZATIONS[factorization].skeleton(conv, layer_rank)
        replacements[id(conv)] = _carry_state(conv, layer, name)
    for _, parent, child, conv in uses:
        if id(conv) in replacements:  # a shared conv: one factorized module wherever it was used
            setattr(parent, child, replacements[id(conv)])
    if skipped:
        lines = "\n".join(f"  {n}: {why}" for n, why in skipped.items())
        warnings.warn(f"factorize left {len(skipped)} layer(s) dense:\n{lines}", stacklevel=2)
    if not replacements and skipped:
        raise ValueError(f"factorize: no layer could be factorized; left dense: {skipped}")
    return target


def _why_not(conv, rank, factorization):
    """Why ``conv`` stays dense at ``rank`` (a sentence), or None where it is factorized."""
    from .._conv_modules import check_plain_conv

    if not isinstance(conv, nn.Linear):
        try:
            check_plain_conv(conv, "factorize")
        except TypeError as exc:
            return str(exc).split(";")[0]
    if factorization in ("cp", "svd") and getattr(conv, "groups", 1) != 1:
        keeps = "factorization='tucker' keeps groups" if factorization == "cp" else "it stays as it is"
        return f"groups={conv.groups}: a {factorization.upper()} factorization mixes all channels; {keeps}"
    if factorization == "svd" and isinstance(rank, (tuple, list)):
        return f"rank={rank!r}: a truncated SVD has one rank (an int, or a float fraction of the parameters)"
    try:  # parameters counted without memory
        if factorization == "svd":
            skeleton = _low_rank(conv, rank, decompose=False, device="meta")
        else:
            skeleton = FACTORIZATIONS[factorization].skeleton(conv, rank, device="meta")
    except ValueError as exc:
        return f"rank={rank!r} does not fit this layer: {exc}"
    dense = conv.weight.numel()
    # "same" and fractions >= 1 ask for as many parameters as the dense conv (the paper's
    # setting): only a smaller budget is a request to compress
    compress = not (rank == "same" or (isinstance(rank, float) and rank >= 1))
    if compress and skeleton.n_params >= dense:
        return (
            f"at rank={skeleton.rank} the factorized layer has {skeleton.n_params} parameters, not fewer than "
            f"the dense conv's {dense}"
        )
    return None


#: the hook tables torch's Module.__call__ runs: shared with the factorized module, so a hook (and
#: its handle's remove()) works on the module that replaced the conv
_CALL_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
#: hooks on a module's state-dict keys, which the factorized module does not have
_STATE_HOOKS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _carry_state(conv, layer, name):
    """What the conv was besides its weights: frozen or trainable, training or eval mode, its hooks."""
    layer.train(conv.training)
    for p in layer.parameters():
        p.requires_grad_(conv.weight.requires_grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(conv.bias.requires_grad)
    for attr in _CALL_HOOKS:
        table = getattr(conv, attr, None)
        if table:
            setattr(layer, attr, table)
    if getattr(conv, "_is_full_backward_hook", None) is not None:
        layer._is_full_backward_hook = conv._is_full_backward_hook
    lost = [attr.strip("_") for attr in _STATE_HOOKS if getattr(conv, attr, None)]
    if lost:
        warnings.warn(
            f"factorize: {name} had {', '.join(lost)} hooks, which refer to nn.Conv's state-dict keys "
            f"(weight, bias); they are not carried to the factorized layer: register them again there",
            stacklevel=3,
        )
    return layer


def _example_inputs(model, inputs):
    """The model's positional inputs from a shape (one input), a tuple of shapes (one each), or
    example tensors (one, or a tuple of them): zeros in the model's dtype and device for shapes."""
    p = next(model.parameters())

    def one(item, where):
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, (tuple, list, torch.Size)) and all(is_integral(d) and int(d) >= 0 for d in item):
            return torch.zeros(tuple(int(d) for d in item), device=p.device, dtype=p.dtype)
        raise TypeError(
            f"summarize: input_shape{where}={item!r}: expected a shape (a tuple of ints, batch included), "
            f"a tuple of shapes for a model with several inputs, or example tensors"
        )

    if isinstance(inputs, torch.Tensor) or (
        isinstance(inputs, (tuple, list, torch.Size)) and all(is_integral(d) for d in inputs)
    ):
        return (one(inputs, ""),)
    if isinstance(inputs, (tuple, list)) and inputs:
        return tuple(one(item, f"[{i}]") for i, item in enumerate(inputs))
    return (one(inputs, ""),)


def _traced_shapes(model, inputs):
    """Each factorized layer's and dense conv's (input shape, output shape), from one forward pass
    (hooks, eval mode, no gradients)."""
    shapes = {}

    def record(name):
        def hook(module, args, output):
            shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))  # returns None: output unchanged

        return hook

    hooks = [
        (m, "post", record(name)) for name, m in model.named_modules() if isinstance(m, _COMPRESSED) or _eligible(m)
    ]
    observe(model, hooks, [_example_inputs(model, inputs)])
    return shapes


def _fmt(n):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def summarize(model: nn.Module, input_shape: Any = None) -> str:
    """A table of the factorized layers of ``model`` (low-rank ones of :func:`plan_compression`
    included) and of the convs :func:`factorize` kept dense (rank ``dense``): name, kernel shape,
    rank, parameters (dense -> factorized), relative reconstruction error (layers made by
    ``from_conv`` / :func:`factorize` / ``from_linear``), and with
    ``input_shape`` the multiply-adds of the dense conv and of the plan each layer runs; then the
    totals over all those convs.

    ``input_shape``: the input's shape, batch included; for a model with several inputs a tuple
    of shapes, one per input; or example tensors (one, or a tuple of them).

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
    rows = [(name, m) for name, m in model.named_modules() if isinstance(m, _COMPRESSED) or _eligible(m)]
    if not any(isinstance(m, _COMPRESSED) for _, m in rows):
        raise ValueError(
            "summarize: the model has no factorized layer (KruskalConv / TuckerConv / LowRankConv / LowRankLinear); "
            "see factorize() and plan_compression()"
        )
    shapes = _traced_shapes(model, input_shape) if input_shape is not None else {}
    table = [("layer", "kernel (T, C, *K)", "rank", "params dense -> factorized", "rel. error", "MACs dense -> plan")]
    tot_dense = tot_fact = mac_dense = mac_plan = 0
    for name, m in rows:
        factorized = isinstance(m, _COMPRESSED)
        dense = m.dense_params if factorized else m.weight.numel()
        fact = m.n_params if factorized else dense
        tot_dense += dense
        tot_fact += fact
        ratio = f"{dense / fact:.1f}x fewer" if fact <= dense else f"{fact / dense:.1f}x more"
        err = getattr(m, "relative_error", None)
        macs = "-"
        if name in shapes:
            if isinstance(m, _LowRank):  # two thin matrix products at every output position
                positions = math.prod(shapes[name][1]) // m.kernel_shape[0]
                dense_macs, plan_macs = positions * dense, positions * fact
            elif factorized:
                plan = m.plan(shapes[name][0])
                # a TuckerConv with groups > 1 replaces a grouped conv (KruskalConv.groups is 1)
                dense_macs, plan_macs = plan.dense_macs // m.groups, plan.macs
            else:  # kept dense: each output element reads C / groups * prod(K) inputs
                dense_macs = plan_macs = math.prod(shapes[name][1]) * dense // m.out_channels
            mac_dense += dense_macs
            mac_plan += plan_macs
            macs = f"{_fmt(dense_macs)} -> {_fmt(plan_macs)}"
        if not factorized:
            rank = "dense"
            ratio = "kept"
        else:
            rank = m.rank if isinstance(m.rank, int) else "x".join(str(r) for r in m.rank)
        shape = m.kernel_shape if isinstance(m, _LowRank) else (m.out_channels, m.in_channels) + tuple(m.kernel_size)
        table.append(
            (
                name,
                str(shape),
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
