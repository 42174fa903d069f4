"""PyTorch backend (CPU and CUDA). Keeps each tensor's device and dtype; autograd flows
through every primitive because each one is a torch op."""

from ._base import FLOAT_ITEMSIZES, ArrayBackend

_DTYPES = tuple(FLOAT_ITEMSIZES)


def _contiguous_weight(weight):
    """A conv weight as ATen's CPU fallback kernels need it for their backward: slow_conv2d
    allocates its weight gradient in the weight's memory format and then insists on a contiguous
    one, which fails for a strided view with one output channel (its layout is ambiguous: CP rank
    1, Tucker R_out = 1, T = 1). Only those are copied: other views keep the layout that oneDNN
    reads without a reorder."""
    if weight.shape[0] == 1 and not weight.is_contiguous():
        return weight.contiguous()
    return weight


class TorchBackend(ArrayBackend):
    name = "torch"

    def __init__(self):
        import torch
        import torch.nn.functional as F

        super().__init__(torch)
        self.F = F

    def device(self, x):
        return x.device

    def dtype_name(self, x):
        return str(x.dtype).replace("torch.", "")

    def itemsize(self, x):
        return x.element_size()

    def resolve_dtype(self, dtype):
        torch = self.xp
        if dtype is None:
            return torch.float64
        if isinstance(dtype, torch.dtype):
            return dtype
        name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
        if name not in _DTYPES:
            raise TypeError(f"dtype={dtype!r} is not a floating torch dtype; expected one of {sorted(_DTYPES)}")
        return getattr(torch, name)

    def asarray(self, data, *, dtype=None, device=None):
        return self.xp.as_tensor(data, dtype=self.resolve_dtype(dtype) if dtype is not None else None, device=device)

    def zeros(self, shape, *, like):
        return self.xp.zeros(shape, dtype=like.dtype, device=like.device)

    def ones(self, shape, *, like):
        return self.xp.ones(shape, dtype=like.dtype, device=like.device)

    def eye(self, n, *, like):
        return self.xp.eye(n, dtype=like.dtype, device=like.device)

    def astype(self, x, dtype):
        return x.to(self.resolve_dtype(dtype))

    def random_normal(self, shape, *, seed, dtype=None, device=None):
        torch = self.xp
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        out = torch.randn(shape, generator=gen, dtype=torch.float64)
        return out.to(device=device, dtype=self.resolve_dtype(dtype))

    def is_floating(self, x):
        return x.is_floating_point()

    def is_inexact(self, x):
        return x.is_floating_point() or x.is_complex()

    def _has_autocast(self, device_type):
        # the meta device (shape inference, deferred init) has no autocast: asking raises there
        available = getattr(self.xp.amp, "is_autocast_available", None)
        return available(device_type) if available is not None else device_type in ("cpu", "cuda")

    def autocast_dtype(self, x):
        torch = self.xp
        dev = x.device.type
        if not self._has_autocast(dev):
            return None
        if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
            return torch.get_autocast_dtype(dev)  # autocast leaves float64 alone, as here
        return None

    def autocast_off(self, x):
        if not self._has_autocast(x.device.type):
            return super().autocast_off(x)
        return self.xp.autocast(x.device.type, enabled=False)

    def is_tracing(self):
        return self.xp.jit.is_tracing()

    def all_finite(self, x):
        return bool(self.xp.isfinite(x.detach()).all())

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

    def from_numpy(self, a, *, like=None, dtype=None, device=None):
        out = self.xp.from_numpy(a) if hasattr(a, "__array__") else self.xp.as_tensor(a)
        if like is not None:
            return out.to(device=like.device, dtype=like.dtype)
        return out.to(device=device, dtype=self.resolve_dtype(dtype) if dtype is not None else out.dtype)

    def flip(self, x, axis):
        return self.xp.flip(x, dims=(axis,))

    def permute(self, x, axes):
        return x.permute(*axes)

    def moveaxis(self, x, source, destination):
        # movedim, not torch.moveaxis: only movedim has a batching rule (torch.func.vmap)
        return x.movedim(source, destination)

    def concat(self, arrays, axis):
        return self.xp.cat(arrays, dim=axis)

    def contiguous(self, x):
        return x.contiguous()

    def take(self, x, indices, axis):
        return x.index_select(axis, self.xp.as_tensor(indices, device=x.device))

    def tile_checkpoint(self, x, tensors):
        torch = self.xp
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and getattr(t, "requires_grad", False) for t in [x] + list(tensors)
        )
        if not needs_grad:
            return lambda fn, *args: fn(*args)
        from torch.utils.checkpoint import checkpoint

        # keep only the tile's input and output; backward recomputes the tile's intermediates
        return lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)

    def einsum(self, subscripts, *operands):
        return self.xp.einsum(subscripts, *operands)

    def tensordot(self, a, b, axes):
        return self.xp.tensordot(a, b, dims=axes)

    def add_(self, out, term):
        # in-place is safe for autograd here: `out` was produced by an op that does not save
        # its own output for backward (einsum / mul); it avoids one allocation per tap
        return out.add_(term)

    def mul_add_(self, out, a, b):
        return out.addcmul_(a, b)

    def pad_axis(self, x, axis, low, high, mode):
        # torch's own constant pad is one kernel instead of a concatenation
        if mode == "zeros" and (low or high):
            pads = [0, 0] * (x.ndim - 1 - axis % x.ndim) + [low, high]
            return self.F.pad(x, pads)
        return super().pad_axis(x, axis, low, high, mode)

    def native_conv_ok(self, x):
        # oneDNN has no float64 kernels, and ATen's CPU fallback depthwise convs run slower than
        # a tap loop of elementwise multiply-adds
        return x.is_cuda or x.dtype != self.xp.float64

    @staticmethod
    def _split_padding(padding, padding_mode, first_axis):
        """(pads to apply first or None, native padding): symmetric zero padding is left to the
        conv itself (no copy); anything else is applied first, to the spatial axes from
        ``first_axis`` on."""
        if padding is None or not any(lo or hi for lo, hi in padding):
            return None, 0
        if padding_mode == "zeros" and all(lo == hi for lo, hi in padding):
            return None, tuple(lo for lo, _ in padding)
        return {first_axis + m: p for m, p in enumerate(padding) if p != (0, 0)}, 0

    def conv_dense(self, x, weight, *, stride, dilation, groups=1, padding=None, padding_mode="zeros"):
        n = x.ndim - 2
        if not 1 <= n <= 3:
            return None  # torch has no conv4d: the plans loop over the taps
        pre_pad, native_pad = self._split_padding(padding, padding_mode, first_axis=2)
        if pre_pad is not None:
            x = self.pad(x, pre_pad, padding_mode)
        conv = (self.F.conv1d, self.F.conv2d, self.F.conv3d)[n - 1]
        return conv(x, _contiguous_weight(weight), None, tuple(stride), native_pad, tuple(dilation), groups)

    def native_conv_expected(self, itemsize, device=None):
        on_gpu = device is not None and str(getattr(device, "type", device)) != "cpu"
        return on_gpu or itemsize != 8  # as native_conv_ok: no oneDNN kernels for float64

    def channels_last_conv(self, act_shape, weight_shape, *, stride, dilation, padding, padding_mode, groups):
        """``run(act, weight)`` for these static shapes, or None where the caller's tap loop runs.

        Every decision that depends on shapes only is taken here, once per plan step, so a
        call costs the conv and a few views. A contiguous (B, *D, C) tensor viewed as
        (B, C, *D) has exactly the channels_last strides, so oneDNN / cuDNN run their
        channels-last kernels and return channels-last output, which viewed back is again
        contiguous (B, *D', T). Modes beyond 3 are folded into neighbours when only one mode is
        convolved (a view as well).
        """
        F, torch = self.F, self.xp
        n = len(act_shape) - 2
        ks = tuple(weight_shape[2:])
        stride, dilation = tuple(stride), tuple(dilation)
        active = [m for m in range(n) if ks[m] != 1 or stride[m] != 1 or dilation[m] != 1 or padding[m] != (0, 0)]
        if n > 3 and len(active) > 1:
            return None  # decided before any padding is done: the caller's tap loop pads itself
        pre_pad, native_pad = self._split_padding(padding, padding_mode, first_axis=1)
        pointwise = all(k == 1 for k in ks)
        if pointwise and native_pad:
            # a 1x1 kernel never reads across positions: its padding is applied here, not by the conv
            pre_pad, native_pad = {1 + m: p for m, p in enumerate(padding) if p != (0, 0)}, 0
        strided = pointwise and any(v != 1 for v in stride)
        t, per_group = int(weight_shape[0]), int(weight_shape[1])

        def prepare(act):
            if pre_pad is not None:
                act = self.pad(act, pre_pad, padding_mode)
            if strided:
                # a strided 1x1 conv is a subsampled GEMM. oneDNN's strided 1x1 convs on channels-last
                # views gave wrong weight gradients (and a crash with one thread) for a few channels
                act = act[(slice(None),) + tuple(slice(None, None, s) for s in stride)]
            return act

        def positions(shape):  # explicit: a -1 cannot be inferred for an empty batch
            out = 1
            for d in shape[1:-1]:
                out *= d
            return out

        if pointwise:

            def run(act, weight):
                act = prepare(act)
                shape = tuple(act.shape)
                if groups == 1 and not act.is_contiguous():
                    # typically the caller's channels-first input seen channels-last: a GEMM with a
                    # transposed operand reads it in place, where a copy would cost more than the product
                    out = torch.matmul(
                        act.reshape(shape[0], positions(shape), shape[-1]), weight.reshape(t, per_group).transpose(0, 1)
                    )
                    return out.reshape(shape[:-1] + (t,))
                # a 1x1 conv: one conv2d over a (B, C, positions, 1) view. This keeps oneDNN's
                # channels-last GEMM path for any N and for small batch x channels, where
                # conv3d's heuristics fall back to the slow unfold kernel
                x = act.contiguous().reshape(shape[0], positions(shape), 1, shape[-1]).movedim(-1, 1)
                out = F.conv2d(x, weight.reshape(t, per_group, 1, 1), None, 1, 0, 1, groups)
                return out.movedim(1, -1).reshape(shape[:-1] + (t,))

            return run
        if n <= 3:
            conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]

            def run(act, weight):
                x = prepare(act).contiguous().movedim(-1, 1)
                return conv(x, _contiguous_weight(weight), None, stride, native_pad, dilation, groups).movedim(1, -1)

            return run
        m = active[0] if active else 0
        w_shape = (t, per_group, 1, ks[m], 1)
        pad3 = (0, native_pad[m], 0) if native_pad else 0

        def run(act, weight):
            act = prepare(act).contiguous()
            shape = tuple(act.shape)
            before = 1
            for d in shape[1 : 1 + m]:
                before *= d
            after = 1
            for d in shape[2 + m : -1]:
                after *= d
            x = act.reshape(shape[0], before, shape[1 + m], after, shape[-1]).movedim(-1, 1)
            out = F.conv3d(
                x, weight.reshape(w_shape), None, (1, stride[m], 1), pad3, (1, dilation[m], 1), groups
            ).movedim(1, -1)
            return out.reshape(shape[: 1 + m] + (out.shape[2],) + shape[2 + m : -1] + (out.shape[-1],))

        return run
