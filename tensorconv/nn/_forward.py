"""A layer's forward: its kernel through :func:`tensorconv.conv`, plus the bias.

Everything else is conv()'s: eager plans, autocast, and what a tracer records (standard convs,
or under torch.compile / torch.export the opaque op of :mod:`tensorconv.nn._ops`, registered
with the plans by importing it here).
"""

from __future__ import annotations

from .. import accelerators
from ..backends import backend_for_name
from ..plans.plan import conv
from . import _ops  # noqa: F401  (registers the op torch.compile records for a CP kernel)

# made at import (the backend with its array types, the accelerators found on the path): a tracer
# (torch.compile) must not see a registry being filled in the middle of a trace, nor trace the
# search that fills it (dynamo guards on what it reads)
TORCH = backend_for_name("torch")
accelerators.registered()


def layer_conv(layer, x, kernel):
    """``conv(x, kernel)`` with ``layer``'s geometry and strategy, plus ``layer.bias``."""
    out = conv(x, kernel, **layer._conv_arguments())
    if layer.bias is None:
        return out
    # the output's dtype: under autocast nn.ConvNd casts its bias too
    bias = layer.bias.to(out.dtype).reshape((-1,) + (1,) * len(layer.kernel_size))
    # In place where the runtime lets plans reuse buffers (CPU, no backward, no tracer, no
    # torch.func transform): conv() returns a tensor no one else holds, and out + bias was a
    # second output-sized tensor per call (fresh pages in a plain process). Elsewhere a new
    # tensor: a traced graph would hold an in-place add on the output of the op torch.compile /
    # torch.export record, a view autograd forbids changing in place once the graph runs with
    # gradients; torch.func's vmap may batch the bias alone.
    if TORCH.runtime.reuses_buffers(out, (layer.bias,)):
        return out.add_(bias)
    return out + bias
