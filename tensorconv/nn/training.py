"""Model-level helpers for the paper's recipe: transduction, L1 rank selection, pruning."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .hocp import HOCPBlock
from .layers import KruskalConv

__all__ = ["transduct", "lasso", "prune", "factorized_layers"]


def factorized_layers(model):
    """(name, KruskalConv) for every CP layer in ``model`` (inside HOCPBlocks too)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, KruskalConv)]


def lasso(model: nn.Module, gamma: float) -> torch.Tensor:
    """``gamma * sum |lambda|`` over every CP layer: add it to the loss (paper sec. 4).

    The penalty is built from the live ``weights`` parameters, so it reaches their gradients.
    """
    layers = factorized_layers(model)
    if not layers:
        raise ValueError("lasso: the model has no KruskalConv layer")
    return gamma * sum(layer.weights.abs().sum() for _, layer in layers)


def prune(
    model: nn.Module, threshold: float | None = None, *, relative: float | None = None, optimizer: Any = None
) -> dict[str, tuple[int, int]]:
    """Prune every CP layer; returns {name: (old rank, new rank)}.

    ``threshold``: drop components with |lambda| <= threshold (one cut for the whole model);
    ``relative``: drop |lambda| <= relative * that layer's max |lambda| (a cut per layer).
    The Parameter objects stay (an optimizer keeps updating them); pass ``optimizer`` to cut
    its per-parameter state too (see :meth:`KruskalConv.prune`).
    """
    layers = factorized_layers(model)
    if not layers:
        raise ValueError("prune: the model has no KruskalConv layer")
    # a conv inside an HOCPBlock is pruned by its block, which cuts Psi's norm to the same components
    blocks = {f"{name}.conv" if name else "conv": m for name, m in model.named_modules() if isinstance(m, HOCPBlock)}
    out = {}
    for name, layer in layers:
        old = layer.rank
        owner = blocks.get(name, layer)
        out[name] = (old, owner.prune(threshold, relative=relative, optimizer=optimizer))
    return out


_BN_UP = {nn.BatchNorm1d: nn.BatchNorm2d, nn.BatchNorm2d: nn.BatchNorm3d}
_POOL_UP = {
    nn.MaxPool1d: nn.MaxPool2d,
    nn.MaxPool2d: nn.MaxPool3d,
    nn.AvgPool1d: nn.AvgPool2d,
    nn.AvgPool2d: nn.AvgPool3d,
}


def _as_tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def transduct(
    model: nn.Module,
    kernel_size: int,
    position: int = 0,
    padding: Any = "same",
    stride: int = 1,
    dilation: int = 1,
    init: str = "ones",
    freeze: bool = True,
) -> nn.Module:
    """Transduct every KruskalConv of ``model`` to one more spatial dim, in place.

    BatchNorm{1,2}d become BatchNorm{2,3}d (state copied: they are per-channel, so this is
    unambiguous) and Max/AvgPool{1,2}d become their next-dimensional versions with a window
    of 1 along the new mode. Any other dimension-specific module (a dense ConvNd, an adaptive
    pool, a flatten before a linear layer) is left alone and named in a warning: decide how
    it should see the new mode. Returns the model.
    """
    if isinstance(model, KruskalConv):  # a bare layer has no parent to look at it from
        return model.transduct(kernel_size, position, padding, stride, dilation, init, freeze)
    left = []
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if getattr(module, "works_for_any_n", False):
                continue  # a norm over a flattened view (its BatchNorm1d sees (B, C, positions) for any N)
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, KruskalConv):
                    child.transduct(kernel_size, position, padding, stride, dilation, init, freeze)
                elif hasattr(child, "transduct") and callable(child.transduct):
                    # modules that know how to take a new mode (tensorconv.nn.resnet's pools and heads)
                    child.transduct(position)
                elif type(child) in _BN_UP:
                    new = _BN_UP[type(child)](
                        child.num_features,
                        child.eps,
                        child.momentum,
                        child.affine,
                        child.track_running_stats,
                        device=_device(child),
                        dtype=_dtype(child),
                    )
                    new.load_state_dict(child.state_dict())
                    new.train(child.training)
                    setattr(module, child_name, new)
                elif type(child) in _POOL_UP:
                    n = 1 if type(child) in (nn.MaxPool1d, nn.AvgPool1d) else 2
                    ins = lambda v, fill: _as_tuple(v, n)[:position] + (fill,) + _as_tuple(v, n)[position:]  # noqa
                    kw = dict(
                        kernel_size=ins(child.kernel_size, 1),
                        stride=ins(child.stride, 1),
                        padding=ins(child.padding, 0),
                        ceil_mode=child.ceil_mode,
                    )
                    if isinstance(child, (nn.MaxPool1d, nn.MaxPool2d)):
                        kw["dilation"] = ins(child.dilation, 1)
                    setattr(module, child_name, _POOL_UP[type(child)](**kw))
                elif isinstance(
                    child,
                    (
                        nn.Conv1d,
                        nn.Conv2d,
                        nn.Conv3d,
                        nn.AdaptiveAvgPool1d,
                        nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool1d,
                        nn.AdaptiveMaxPool2d,
                    ),
                ) and not isinstance(module, HOCPBlock):
                    left.append(full)
    if freeze:
        # the paper trains the new temporal factors alone first: every other parameter of the
        # model (norms, heads, skips) waits too, until model.requires_grad_(True)
        new_factors = {id(layer.factors[2 + position]) for _, layer in factorized_layers(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in new_factors)
    if left:
        warnings.warn(f"transduct left these dimension-specific modules unchanged: {left}", stacklevel=2)
    return model


def _first_tensor(m):
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t
    return None


def _device(m):
    t = _first_tensor(m)
    return None if t is None else t.device


def _dtype(m):
    t = _first_tensor(m)
    return None if t is None else t.dtype
