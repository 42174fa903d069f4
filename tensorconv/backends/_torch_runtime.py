"""torch's runtime behind :class:`Runtime`: autocast, its tracers, checkpointed tiles."""

import contextlib
import functools
import sys

from ._runtime import Runtime


def _storage_refs(torch, t):
    """(the storage's C++ use count, the Python references to its storage object) of ``t``, or
    None where torch does not expose the use count."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    storage = t.untyped_storage()
    # every view, detached alias or NumPy array of t holds a TensorImpl that holds the storage
    # (the use count); a storage object kept on its own only adds Python references to it
    return use_count(storage._cdata), sys.getrefcount(storage)


@functools.lru_cache(maxsize=None)
def _unreferenced_refs(torch):
    """:func:`_storage_refs` of a fresh tensor nobody else refers to, taken once."""
    return _storage_refs(torch, torch.empty(1))


class TorchRuntime(Runtime):
    def _has_autocast(self, device_type):
        # the meta device (shape inference, deferred init) has no autocast: asking raises there
        available = getattr(self.backend.xp.amp, "is_autocast_available", None)
        return available(device_type) if available is not None else device_type in ("cpu", "cuda")

    def autocast_dtype(self, x):
        torch = self.backend.xp
        dev = x.device.type
        if not self._has_autocast(dev):
            return None
        if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
            return torch.get_autocast_dtype(dev)  # autocast leaves float64 alone, as here
        return None

    def autocast_off(self, x):
        if not self._has_autocast(x.device.type):
            return super().autocast_off(x)
        return self.backend.xp.autocast(x.device.type, enabled=False)

    def tracer(self):
        torch = self.backend.xp
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return "trace"  # the graph is made of standard ops (TorchScript, ONNX)
        if torch.compiler.is_compiling():
            return "compile"  # dynamo or torch.export: a registered custom op may be recorded
        return None

    def static_shape(self, x):
        shape = tuple(x.shape)
        return shape if all(type(d) is int for d in shape) else None  # SymInts: sizes left symbolic

    @contextlib.contextmanager
    def untraced(self):
        torch = self.backend.xp
        if not torch.jit.is_tracing():
            yield
            return
        # jit.trace hands out sizes as traced tensors and records what reads them: paused, it
        # hands out ints and records (and warns about) nothing
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            yield
        finally:
            torch._C._set_tracing_state(state)

    def _needs_grad(self, x, tensors):
        return self.backend.xp.is_grad_enabled() and any(
            t is not None and getattr(t, "requires_grad", False) for t in [x, *tensors]
        )

    def reuses_buffers(self, x, tensors):
        # CPU only: CUDA's caching allocator already hands freed blocks back, where glibc returns
        # large ones to the kernel and takes fresh, zeroed pages for them on the next call. Not
        # under a torch.func transform either: vmap has no batching rule for ops with out=
        torch = self.backend.xp
        return (
            x.device.type == "cpu"
            and not torch._C._are_functorch_transforms_active()
            and self.tracer() is None
            and not self._needs_grad(x, tensors)
        )

    def unreferenced(self, buf):
        refs = _storage_refs(self.backend.xp, buf)
        # against the counts of a tensor nobody else refers to, taken the same way: how many
        # references the storage's Python object holds varies across torch versions
        return refs is not None and refs == _unreferenced_refs(self.backend.xp)

    def tile_checkpoint(self, x, tensors):
        if not self._needs_grad(x, tensors):
            return super().tile_checkpoint(x, tensors)
        from torch.utils.checkpoint import checkpoint

        # keep only the tile's input and output; backward recomputes the tile's intermediates
        return lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)
