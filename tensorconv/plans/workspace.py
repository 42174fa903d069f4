"""Buffers a plan's intermediates are written into, kept from call to call.

A factorized conv's intermediates (the rank-R activations between its steps) are often several
times its output. Allocated anew on every call, the large ones cost more than the arithmetic in a
plain process: glibc hands allocations above its mmap threshold (at most 32 MB) back to the
kernel when freed, and the next call page-faults fresh, zeroed pages in again. A dense conv
allocates only its output.

Where the runtime allows it (:meth:`Runtime.reuses_buffers`: torch on a CPU, no backward to
feed, no tracer recording, no torch.func transform), every step but the last whose output
reaches :data:`MIN_BYTES` writes it into one of two flat buffers and the next step reads it from
there: each intermediate is read only by the step after the one that wrote it, so two buffers
that alternate suffice.
The last step's output is a new array: it is the caller's. Smaller intermediates are allocated
as before: glibc reuses freed blocks below its mmap threshold without new pages, and writing
into a buffer costs a few extra ops per step (and a zeroing pass for the oneDNN convs) that
only page faults outweigh.

Outputs are the caller's, but a large one the caller has let go of is memory the next call can
write into: :meth:`Workspace.output` hands out a view of a kept flat buffer where nothing refers
to that buffer any more (:meth:`Runtime.reuses_buffers` and :meth:`Runtime.unreferenced`: no
view, array or storage object of an earlier output is left), else a new buffer, of which it
keeps the :data:`KEPT_OUTPUTS` most recent. A model whose layers each hand their output to the
next layer and let it go reuses one such buffer for all of them; an output that is still held
is never written into.

The buffers are **per thread** and shared by every plan that runs in that thread (plans run one
after another there, and none reads another's intermediates), one pair per device and dtype,
grown to the largest intermediate run so far. So a model holds two buffers the size of its
largest intermediate, not a pair per layer. They are freed when the thread ends, or by
:func:`free_workspace`.
"""

from __future__ import annotations

import math
import threading

__all__ = [
    "KEPT_OUTPUTS",
    "MIN_BYTES",
    "OUTPUT",
    "Workspace",
    "free_workspace",
    "output_buffer",
    "step_buffers",
    "workspace_for",
]

_local = threading.local()

#: the smallest intermediate (bytes) a step writes into a buffer: glibc's largest mmap threshold
#: (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit), from which on every allocation takes fresh pages
MIN_BYTES = 32 * 1024 * 1024


#: the slot :func:`step_buffers` gives a plan's last step: :meth:`Workspace.output`
OUTPUT = "output"

#: how many output buffers of at least :data:`MIN_BYTES` a thread keeps per device and dtype
KEPT_OUTPUTS = 2


class Workspace:
    """Two flat buffers of one device and dtype that a plan's steps write into in turn, and the
    last few large outputs handed out (:meth:`output`)."""

    def __init__(self, backend):
        self._backend = backend
        self._buffers = [None, None]
        self._outputs = []

    def buffer(self, slot, numel, like):
        """The first ``numel`` elements of buffer ``slot`` (0 or 1), grown where it is smaller; for
        slot :data:`OUTPUT`, :meth:`output`."""
        if slot == OUTPUT:
            return self.output(numel, like)
        buf = self._buffers[slot]
        if buf is None or buf.shape[0] < numel:
            self._buffers[slot] = None  # the smaller one goes before the larger one is made
            buf = self._buffers[slot] = self._backend.empty((numel,), like=like)
        return buf[:numel]

    def output(self, numel, like):
        """A flat array of ``numel`` elements for a call's output: a kept one nothing refers to
        any more, else a new one (kept in place of the oldest). Only for outputs of at least
        :data:`MIN_BYTES`, and only where :meth:`Runtime.reuses_buffers` allows it."""
        unreferenced = self._backend.runtime.unreferenced
        for i, buf in enumerate(self._outputs):
            if buf.shape[0] == numel and unreferenced(buf):
                self._outputs.insert(0, self._outputs.pop(i))
                return buf[:]  # a view: while the caller holds it, the buffer is referenced
        buf = self._backend.empty((numel,), like=like)
        self._outputs = [buf, *self._outputs[: KEPT_OUTPUTS - 1]]
        return buf[:]

    @property
    def nbytes(self):
        """Bytes the buffers hold (outputs handed out and still held by callers included)."""
        kept = [b for b in self._buffers if b is not None] + self._outputs
        return sum(int(b.shape[0]) * self._backend.itemsize(b) for b in kept)


def workspace_for(backend, like):
    """This thread's :class:`Workspace` for ``like``'s backend, device and dtype."""
    spaces = getattr(_local, "spaces", None)
    if spaces is None:
        spaces = _local.spaces = {}
    key = (backend.name, str(backend.device(like)), backend.dtype_name(like))
    space = spaces.get(key)
    if space is None:
        space = spaces[key] = Workspace(backend)
    return space


def output_buffer(backend, x, tensors, shape):
    """The kept buffer (:meth:`Workspace.output`) a call on ``x`` writes its output of ``shape``
    into, as a view of that shape: for outputs of at least :data:`MIN_BYTES` where
    :meth:`Runtime.reuses_buffers` allows it (``tensors``: the call's other inputs); else None (a
    new array). What an accelerator asks where a plan's last step has slot :data:`OUTPUT`."""
    numel = math.prod(shape)
    if backend.itemsize(x) * numel < MIN_BYTES or not backend.runtime.reuses_buffers(x, tensors):
        return None
    return backend.reshape(workspace_for(backend, x).output(numel, like=x), tuple(shape))


def free_workspace():
    """Free the buffers the plans and accelerators keep in the calling thread; returns the bytes
    freed.

    The next call of a plan allocates them again. Other threads' buffers are theirs (freed when
    they end; an accelerator's pool threads keep their scratch for the process). Outputs handed
    out are freed once their holders let them go.
    """
    from ..accelerators import registered

    spaces = getattr(_local, "spaces", None) or {}
    freed = sum(space.nbytes for space in spaces.values())
    _local.spaces = {}
    return freed + sum(accelerator.release_buffers() for accelerator in registered())


def step_buffers(steps, first_result, itemsize):
    """For each step, ``(slot, numel)`` where its output is written into a buffer, else None.
    ``first_result``: the index of step 0's output among the step operands (after the input and
    the kernel's arrays).

    Activation steps whose output reaches :data:`MIN_BYTES` take the slot their input is not in,
    the last one (whose output is the caller's) :data:`OUTPUT`; the weights-only steps (small,
    and read by later steps than the next) take none.
    """
    acts = [j for j, step in enumerate(steps) if step.kind != "weights"]
    slots, buffers = {}, [None] * len(steps)
    for j in acts:
        step = steps[j]
        numel = math.prod(step.out_shape)
        if numel * itemsize >= MIN_BYTES:
            slots[first_result + j] = slot = OUTPUT if j == acts[-1] else 1 - slots.get(step.lhs, 1)
            buffers[j] = (slot, numel)
    return tuple(buffers)
