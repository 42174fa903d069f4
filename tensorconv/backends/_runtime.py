"""What a library's runtime asks of a convolution beyond arrays, behind one small interface.

Mixed precision (torch.autocast), tracers (torch.jit.trace, torch.compile, torch.export, ONNX
export), whole-function compilation (jax.jit) and recomputation in the backward
(torch.utils.checkpoint) belong to a framework, not to its arrays: ``backend.runtime`` is the
library's :class:`Runtime`; this base class is a library with none of them (NumPy, CuPy).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

__all__ = ["Runtime", "TRACERS"]

#: what :meth:`Runtime.tracer` may answer: ``"trace"`` records standard ops only (torch.jit.trace,
#: ONNX export), ``"compile"`` may also record a registered opaque op (torch.compile, torch.export)
TRACERS = (None, "trace", "compile")


class Runtime:
    """A library's runtime hooks; the base class is a library without any (every answer is "no")."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def autocast_dtype(self, x) -> Any:
        """The dtype a mixed-precision region (torch.autocast) asks convs on ``x`` to compute in,
        or None (no such region, or ``x`` is not cast by it)."""
        return None

    def autocast_off(self, x):
        """A context in which no mixed-precision region casts ops on ``x``'s device."""
        return contextlib.nullcontext()

    def tracer(self) -> str | None:
        """Which tracer records this call, one of :data:`TRACERS`: a tracer sees the ops a call
        makes, so a plan chosen in Python for one input shape must not be what it records."""
        return None

    def static_shape(self, x) -> tuple | None:
        """``x``'s shape as ints where a tracer sees fixed sizes, None where some are symbolic:
        what a traced call may plan for (read inside :meth:`untraced`)."""
        return tuple(int(d) for d in x.shape)

    def untraced(self):
        """A context in which a tracer records nothing: sizes read there are plain ints."""
        return contextlib.nullcontext()

    def compile_plan(self, run: Callable) -> Callable | None:
        """``run(x, kernel)`` compiled as one program, for libraries that trace whole functions
        (jax.jit); None where ops run one at a time as called (numpy, cupy, torch eager)."""
        return None

    def reuses_buffers(self, x, tensors) -> bool:
        """Whether this call may write its intermediates into buffers kept from call to call
        (:mod:`tensorconv.plans.workspace`): only where no backward will read them, no tracer
        records the call and the library's allocator does not already keep freed memory."""
        return False

    def unreferenced(self, buf) -> bool:
        """Whether nothing but ``buf`` itself refers to its memory (no view, array or storage
        object the caller may still read), so that a later call may write into it again; False
        where the library cannot tell (then buffers handed out are never taken back)."""
        return False

    def tile_checkpoint(self, x, tensors) -> Callable:
        """``call(fn, *args)`` for one tile of a fused plan: where a backward will run through it,
        the tile's intermediates are recomputed there instead of kept (torch's checkpoint)."""
        return lambda fn, *args: fn(*args)
