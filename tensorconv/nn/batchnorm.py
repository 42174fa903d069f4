"""BatchNorm around compression: fold eval-mode BatchNorms into the convolution before them (one
op less per conv at inference: what ONNX Runtime and TensorRT do for dense convs, done here for
factorized ones too), and recompute running statistics after the convolutions changed."""

from __future__ import annotations

import torch
from torch import nn

from .layers import _FactorizedConv

__all__ = ["fold_batchnorm", "recalibrate_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, _FactorizedConv)


class _LeafConvs(torch.fx.Tracer):
    """Convolutions, factorized ones included, are single calls in the traced graph."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _CONVS) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution (``nn.Conv1d/2d/3d``,
    :class:`KruskalConv`, :class:`TuckerConv`) into that convolution, and replace the BatchNorm
    by ``nn.Identity``. For eval mode: the running statistics and the affine parameters become a
    per-output-channel scale of the conv's output factor (``U_T`` of a factorized layer, the
    weight of a dense one) and its bias, so the model computes the same in eval mode with one op
    less per conv (an exported ONNX graph has no BatchNormalization node there).

    A pair is folded only where the conv's output goes to the BatchNorm alone and each module is
    called once (a conv whose output is also used elsewhere, or a module called twice, is left
    as it is). The model is found by ``torch.fx`` tracing (torchvision's models trace).

    Parameters
    ----------
    model : nn.Module, in eval mode
    inplace : bool
        Change ``model`` itself; by default a deep copy is changed.

    Returns
    -------
    nn.Module
        The model with the folded BatchNorms replaced by ``nn.Identity``; its class is unchanged.

    Raises
    ------
    ValueError
        The model is in training mode (folding uses the running statistics), or torch.fx cannot
        trace it.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorconv.nn import KruskalConv, fold_batchnorm
    >>> net = nn.Sequential(KruskalConv(3, 8, (3, 3), rank=4, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded = fold_batchnorm(net)
    >>> type(folded[1]).__name__
    'Identity'
    >>> x = torch.randn(2, 3, 8, 8)
    >>> bool(torch.allclose(folded(x), net(x), atol=1e-5))
    True
    """
    if model.training:
        raise ValueError(
            "fold_batchnorm: the model is in training mode; BatchNorm folds by its running statistics, "
            "which describe eval mode: call model.eval() first"
        )
    import copy

    target = model if inplace else copy.deepcopy(model)
    try:
        graph = _LeafConvs().trace(target)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise ValueError(
            f"fold_batchnorm: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            f"fold pairs by hand or make the model traceable"
        ) from None
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(target.named_modules())
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[node.target]
        source = node.args[0] if node.args else None
        if (
            not isinstance(source, torch.fx.Node)
            or source.op != "call_module"
            or not isinstance(modules.get(source.target), _CONVS)
            or len(source.users) != 1
            or calls[source.target] != 1
            or calls[node.target] != 1
            or bn.running_mean is None
        ):
            continue
        conv = modules[source.target]
        if bn.num_features != conv.out_channels:
            continue
        _fold(conv, bn)
        _replace(target, node.target, nn.Identity())
    return target


def _fold(conv, bn):
    """conv's output channel t scaled by s_t = gamma_t / sqrt(var_t + eps), its bias mapped to
    s_t (b_t - mean_t) + beta_t."""
    with torch.no_grad():
        ref = conv.factors[0] if isinstance(conv, _FactorizedConv) else conv.weight
        var = bn.running_var.to(torch.float64)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(torch.float64)
        shift = -bn.running_mean.to(torch.float64) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(torch.float64)
        # U_T (T, R) of a factorized layer, or the dense weight (T, C / groups, *K): rows are outputs
        ref.mul_(scale.to(ref.dtype).reshape((-1,) + (1,) * (ref.ndim - 1)))
        bias = shift if conv.bias is None else conv.bias.to(torch.float64) * scale + shift
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=ref.dtype, device=ref.device))
        conv.bias.copy_(bias.to(conv.bias.dtype))


def _replace(root, qualname, module):
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Recompute every BatchNorm's running statistics from ``batches``, in place.

    After :func:`~tensorconv.nn.factorize` the activations a BatchNorm sees are not those its
    running mean and variance describe; forwarding a few batches of real inputs through the
    compressed model (no gradients, nothing else trained) recomputes them. Each BatchNorm's
    statistics are reset and accumulated as the plain average over the batches (momentum None
    for the pass: equal-sized batches give the mean over all samples, and the average of the
    batches' unbiased variances); the momentum, the training flags and the parameters are
    restored afterwards.

    Parameters
    ----------
    model : nn.Module
    batches : iterable
        Model inputs: tensors, or tuples of positional inputs (e.g. a DataLoader's inputs).

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        No batch, or no BatchNorm that tracks running statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError("recalibrate_batchnorm: the model has no BatchNorm that tracks running statistics")
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in norms}
    seen = 0
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the batches
            bn.train()
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                seen += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    if not seen:
        raise ValueError("recalibrate_batchnorm: batches gave no batch; pass a few batches of real inputs")
    return model
