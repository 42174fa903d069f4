"""torch's own convolutions (oneDNN on CPU, cuDNN on CUDA) behind :class:`NativeConvs`."""

import math

import torch

from ._base import device_type
from ._native import NativeConvs


def _contiguous_weight(weight):
    """A conv weight as ATen's CPU fallback kernels need it for their backward: slow_conv2d
    allocates its weight gradient in the weight's memory format and then insists on a contiguous
    one, which fails for a strided view with one output channel (its layout is ambiguous: CP rank
    1, Tucker R_out = 1, T = 1). Only those are copied: other views keep the layout that oneDNN
    reads without a reorder."""
    if not weight.is_contiguous() and not torch.jit.is_tracing() and weight.shape[0] == 1:
        # (not asked under torch.jit.trace: reading the size there records it as a constant and warns)
        return weight.contiguous()
    return weight


def _out_size(size, kernel, stride, padding, dilation):
    """A conv's output length along one mode, ``padding`` on each side."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_into(out, x, weight, stride, padding, dilation, groups):
    """``conv(x, weight)`` written into the flat buffer ``out`` (a view of it returned), where
    oneDNN can; None where it cannot (the caller runs the conv into a new tensor).

    ``x`` is a channels-last view (B, C, *D). The conv has no ``out=``, so this is oneDNN's
    convolution with a fused "add" post-op, which accumulates into the tensor it is handed: the
    buffer, zeroed first, viewed with the channels-last strides oneDNN writes. Inductor uses the
    same op; it records no autograd, which is why only calls that feed no backward pass ``out``.
    """
    if (
        _ADD_INTO is None
        or x.dtype not in _ADD_INTO_DTYPES
        or out.dtype != x.dtype
        or not torch._C._get_mkldnn_enabled()
    ):
        return None
    spatial = tuple(map(_out_size, x.shape[2:], weight.shape[2:], stride, padding, dilation))
    numel = x.shape[0] * math.prod(spatial) * weight.shape[0]
    y = out[:numel].view((x.shape[0],) + spatial + (weight.shape[0],)).movedim(-1, 1).zero_()
    return _ADD_INTO(y, x, weight, None, padding, stride, dilation, groups, "add", None, None, [], None)


_ADD_INTO = getattr(getattr(torch.ops.mkldnn, "_convolution_pointwise_", None), "binary", None)
if _ADD_INTO is not None and not torch.backends.mkldnn.is_available():
    _ADD_INTO = None
_ADD_INTO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


#: input bytes up to which a float32 1-D depthwise step on a CPU runs as the plans' tap loop (a
#: padded copy and one multiply-add per tap) instead of oneDNN's conv: there oneDNN's fixed cost
#: per call is most of the step, and a tap loop keeps nothing per input length
#: (`benchmarks/onednn_steps.py` measures both; this stays well below the size where the conv
#: overtook the loop there, since that size is not measured on every machine of the pool)
TAP_LOOP_BYTES = 512 << 10

#: lengths a 1-D conv step runs at exactly before further ones are bucketed: a model fed a few
#: fixed sizes keeps exact convs (a bucketed one pads a copy of its input), one fed many lengths
#: stops preparing a oneDNN primitive for each
EXACT_LENGTHS = 8


class TorchConvs(NativeConvs):
    """Native convs of torch tensors: float32 / float16 / bfloat16 on CPU, every dtype on a GPU."""

    exists = True

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

    def __init__(self, backend):
        super().__init__(backend)
        #: a 1-D conv's shape apart from its length -> the lengths met (up to EXACT_LENGTHS + 1)
        self._lengths = {}

    def _many_lengths(self, signature, length):
        """Whether the 1-D conv ``signature`` has now met more than EXACT_LENGTHS lengths."""
        met = self._lengths.setdefault(signature, set())
        if len(met) <= EXACT_LENGTHS:
            met.add(length)
        return len(met) > EXACT_LENGTHS

    def has_dims(self, n):
        return 1 <= n <= 3  # torch has conv1d, conv2d and conv3d

    def dense(self, x, weight, *, stride, dilation, groups=1, padding=None, padding_mode="zeros"):
        n = x.ndim - 2
        if not 1 <= n <= 3:
            return None  # torch has no conv4d: the plans loop over the taps
        pre_pad, native_pad = self._split_padding(padding, padding_mode, first_axis=2)
        if pre_pad is not None:
            x = self.backend.pad(x, pre_pad, padding_mode)
        F = self.backend.F
        conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
        return conv(x, _contiguous_weight(weight), None, tuple(stride), native_pad, tuple(dilation), groups)

    def available(self, itemsize, device=None):
        # oneDNN has no float64 kernels, and ATen's CPU fallback depthwise convs run slower than
        # a tap loop of elementwise multiply-adds
        on_gpu = device is not None and device_type(device) != "cpu"
        return on_gpu or itemsize != 8

    def channels_last(
        self, act_shape, weight_shape, *, stride, dilation, padding, padding_mode, groups, itemsize=4, device=None
    ):
        """``run(act, weight)`` for these static shapes, or None where the caller's tap loop runs.

        Every decision that depends on shapes only is taken here, once per plan step, so a
        call costs the conv and a few views. A contiguous (B, *D, C) tensor viewed as
        (B, C, *D) has exactly the channels_last strides, so oneDNN / cuDNN run their
        channels-last kernels and return channels-last output, which viewed back is again
        contiguous (B, *D', T). Modes beyond 3 are folded into neighbours when only one mode is
        convolved (a view as well).
        """
        F, torch = self.backend.F, self.backend.xp
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
                act = self.backend.pad(act, pre_pad, padding_mode)
            if strided:
                # a strided 1x1 conv is a subsampled GEMM. oneDNN's strided 1x1 convs on channels-last
                # views gave wrong weight gradients (and a crash with one thread) for a few channels
                act = act[(slice(None),) + tuple(slice(None, None, s) for s in stride)]
            return act

        def positions(shape):  # explicit: a -1 cannot be inferred for an empty batch
            return math.prod(shape[1:-1])

        if pointwise:

            def run(act, weight, out=None):
                act = prepare(act)
                shape = tuple(act.shape)
                if groups == 1 and (act.device.type == "cpu" or not act.is_contiguous()):
                    # a GEMM: it reads the caller's channels-first input seen channels-last in place
                    # (a copy would cost more than the product), and on a CPU it keeps no state per
                    # shape, where oneDNN's conv compiles a primitive for every new shape (its cache
                    # holds a few hundred: a model fed many input sizes compiled them on every call)
                    # and costs more per call than a small product
                    a = act.reshape(shape[0], positions(shape), shape[-1])
                    w = weight.reshape(t, per_group).transpose(0, 1)
                    if out is None or out.dtype != a.dtype:
                        return torch.matmul(a, w).reshape(shape[:-1] + (t,))
                    y = out[: a.shape[0] * a.shape[1] * t].view(a.shape[0], a.shape[1], t)
                    return torch.matmul(a, w, out=y).reshape(shape[:-1] + (t,))
                # a 1x1 conv: one conv2d over a (B, C, positions, 1) view. This keeps oneDNN's
                # channels-last GEMM path for any N and for small batch x channels, where
                # conv3d's heuristics fall back to the slow unfold kernel
                x = act.contiguous().reshape(shape[0], positions(shape), 1, shape[-1]).movedim(-1, 1)
                out = F.conv2d(x, weight.reshape(t, per_group, 1, 1), None, 1, 0, 1, groups)
                return out.movedim(1, -1).reshape(shape[:-1] + (t,))

            return run
        if (
            n == 1
            and groups == t
            and per_group == 1
            and itemsize == 4
            and device_type(device) == "cpu"
            and math.prod(act_shape) * itemsize <= TAP_LOOP_BYTES
        ):
            return None
        if n == 1:
            # a (B, C, 1, L) view with channels-last strides: a 3-D tensor has no channels-last
            # memory format, so conv1d reorders a channels-last input to channels-first and back
            # (which cost more than the conv itself), and oneDNN's 2-D depthwise kernels run
            # along the last mode
            stride2, dilation2 = (1,) + stride, (1,) + dilation
            pad2 = (0, native_pad[0]) if native_pad else (0, 0)
            # oneDNN prepares a primitive per shape, in one cache of a few hundred for every conv
            # of the process: a conv met at many lengths zero-extends its (padded) input on the
            # right to one of 8 lengths per octave and drops the outputs past the true ones, which
            # are the only ones that read the extension
            length = int(act_shape[1]) + (sum(padding[0]) if pre_pad is not None else 0)
            out_len = _out_size(length, ks[0], stride[0], pad2[1], dilation[0])
            step = 1 << max(0, length.bit_length() - 4)
            signature = (act_shape[0], act_shape[2:], tuple(weight_shape), stride, dilation, padding, groups)
            extra = -length % step if self._many_lengths(signature, length) else 0

            def run(act, weight, out=None):
                act = prepare(act)
                if extra:
                    act = F.pad(act, (0, 0, 0, extra))
                x = act.contiguous().unsqueeze(1).movedim(-1, 1)
                w = _contiguous_weight(weight).unsqueeze(2)
                y = None if out is None or extra else _conv_into(out, x, w, stride2, pad2, dilation2, groups)
                if y is None:
                    y = F.conv2d(x, w, None, stride2, pad2, dilation2, groups)
                y = y.movedim(1, -1).squeeze(1)
                return y[:, :out_len] if extra else y

            return run
        if n <= 3:
            conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
            pad_n = native_pad if native_pad else (0,) * n

            def run(act, weight, out=None):
                x = prepare(act).contiguous().movedim(-1, 1)
                w = _contiguous_weight(weight)
                y = None if out is None else _conv_into(out, x, w, stride, pad_n, dilation, groups)
                if y is None:
                    y = conv(x, w, None, stride, pad_n, dilation, groups)
                return y.movedim(1, -1)

            return run
        m = active[0] if active else 0
        w_shape = (t, per_group, 1, ks[m], 1)
        pad3 = (0, native_pad[m], 0) if native_pad else (0, 0, 0)
        stride3, dilation3 = (1, stride[m], 1), (1, dilation[m], 1)

        def run(act, weight, out=None):
            act = prepare(act).contiguous()
            shape = tuple(act.shape)
            before, after = math.prod(shape[1 : 1 + m]), math.prod(shape[2 + m : -1])
            x = act.reshape(shape[0], before, shape[1 + m], after, shape[-1]).movedim(-1, 1)
            w = weight.reshape(w_shape)
            y = None if out is None else _conv_into(out, x, w, stride3, pad3, dilation3, groups)
            if y is None:
                y = F.conv3d(x, w, None, stride3, pad3, dilation3, groups)
            y = y.movedim(1, -1)
            return y.reshape(shape[: 1 + m] + (y.shape[2],) + shape[2 + m : -1] + (y.shape[-1],))

        return run
