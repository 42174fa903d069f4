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

The buffers are **per thread** and shared by every plan that runs in that thread (plans run one
after another there, and none reads another's intermediates), one pair per device and dtype,
grown to the largest intermediate run so far. So a model holds two buffers the size of its
largest intermediate, not a pair per layer. They are freed when the thread ends, or by
:func:`free_workspace`.
"""

from __future__ import annotations

import math
import threading

__all__ = ["MIN_BYTES", "Workspace", "free_workspace", "step_buffers", "workspace_for"]

_local = threading.local()

#: the smallest intermediate (bytes) a step writes into a buffer: glibc's largest mmap threshold
#: (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit), from which on every allocation takes fresh pages
MIN_BYTES = 32 * 1024 * 1024


class Workspace:
    """Two flat buffers of one device and dtype that a plan's steps write into in turn."""

    def __init__(self, backend):
        self._backend = backend
        self._buffers = [None, None]

    def buffer(self, slot, numel, like):
        """The first ``numel`` elements of buffer ``slot`` (0 or 1), grown where it is smaller."""
        buf = self._buffers[slot]
        if buf is None or buf.shape[0] < numel:
            self._buffers[slot] = None  # the smaller one goes before the larger one is made
            buf = self._buffers[slot] = self._backend.empty((numel,), like=like)
        return buf[:numel]

    @property
    def nbytes(self):
        """Bytes the two buffers hold."""
        return sum(int(b.shape[0]) * self._backend.itemsize(b) for b in self._buffers if b is not None)


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


def free_workspace():
    """Free the buffers the plans keep in the calling thread; returns the bytes freed.

    The next call of a plan allocates them again. Other threads' buffers are theirs (freed when
    they end).
    """
    spaces = getattr(_local, "spaces", None) or {}
    freed = sum(space.nbytes for space in spaces.values())
    _local.spaces = {}
    return freed


def step_buffers(steps, first_result, itemsize):
    """For each step, ``(slot, numel)`` where its output is written into a buffer, else None.
    ``first_result``: the index of step 0's output among the step operands (after the input and
    the kernel's arrays).

    Activation steps whose output reaches :data:`MIN_BYTES` take the slot their input is not in;
    the last one (whose output is the caller's) and the weights-only steps (small, and read by
    later steps than the next) take none.
    """
    acts = [j for j, step in enumerate(steps) if step.kind != "weights"]
    slots, buffers = {}, [None] * len(steps)
    for j in acts[:-1]:
        step = steps[j]
        numel = math.prod(step.out_shape)
        if numel * itemsize >= MIN_BYTES:
            slots[first_result + j] = slot = 1 - slots.get(step.lhs, 1)
            buffers[j] = (slot, numel)
    return tuple(buffers)
