"""Cost model: MACs and bytes per step, turned into seconds by a per-backend roofline.

``time = max(MACs / macs_per_s, bytes / bytes_per_s) + calls * call_overhead_s``.
The defaults are rates of the project's 2-core CPUs (``tensorconv bench roofline`` measures
them, with the command and machine in docs/benchmarks.md); :func:`calibrate` re-measures on the
running machine and returns a model that a caller passes to ``plan_conv(cost_model=...)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from ..backends import backend_for_name, device_type

__all__ = ["CostModel", "cost_model_for", "calibrate", "MODEL_MARGIN", "dense_peak_bytes", "steps_peak_bytes"]

#: how far ahead a choice that rests on rates fitted on a few shapes must be to replace the
#: paper's plain order: the merged-depthwise order and the plane chain were fitted on 16x32x32
#: planes, and on r3d_18's deep layers (thousands of rank components, 7x7 planes) each ran
#: slower than the plain order the model had put just behind it (`tensorconv bench r3d18`)
MODEL_MARGIN = 1.07


@dataclass(frozen=True)
class CostModel:
    macs_per_s: float  # matmul-class throughput
    bytes_per_s: float  # streaming bandwidth
    call_overhead_s: float  # per primitive call (Python + dispatch / launch)
    dense_macs_per_s: float  # the backend's dense convolution (native where it has one)
    conv_macs_per_s: float = 0.0  # a channel-mixing conv over some modes inside a plan (0: = macs_per_s)
    native_steps: bool = False  # steps run as one native conv call (torch), not one call per tap
    depthwise_macs_per_s: float = 0.0  # native depthwise convs (little reuse per MAC; 0: = macs_per_s)
    dense_slow_macs_per_s: float = 0.0  # torch CPU: dense convs that miss oneDNN (see dense_rate)
    float64: "CostModel | None" = None  # the model for float64 where it is not this one at half rate

    def dense_rate(self, batch, channels, in_spatial, groups, kernel_size=None):
        """MAC/s of the backend's dense conv. torch CPU sends small single-image groups=1 convs to
        its unfold kernel instead of oneDNN (ATen's use_mkldnn: batch 1, groups 1, a kernel of at
        most 3 in one of its last two modes, and B*C*D_0*D_1 <= 20480), which has none of
        oneDNN's blocking. A conv whose last two kernel modes both exceed 3 (r3d_18's 3x7x7 stem)
        stays on oneDNN."""
        ks = tuple(kernel_size or ())
        big_kernel = len(ks) >= 2 and ks[-1] > 3 and ks[-2] > 3
        if self.dense_slow_macs_per_s and batch == 1 and groups == 1 and not big_kernel:
            lead = batch * channels
            for d in tuple(in_spatial)[:2]:
                lead *= d
            if lead <= 20480:
                return self.dense_slow_macs_per_s
        return self.dense_macs_per_s

    def for_itemsize(self, itemsize):
        """The model for elements of ``itemsize`` bytes: the rates above are for float32; SIMD
        units do half as many float64 multiply-adds per cycle."""
        if itemsize <= 4:
            return self
        if itemsize == 8 and self.float64 is not None:
            return self.float64
        scale = 4.0 / itemsize
        rates = (
            "macs_per_s",
            "dense_macs_per_s",
            "conv_macs_per_s",
            "depthwise_macs_per_s",
            "dense_slow_macs_per_s",
        )
        return replace(self, **{name: getattr(self, name) * scale for name in rates})

    def seconds(self, macs, nbytes, calls=1, dense=False, kind=None, rate=None):
        if rate is not None:
            pass
        elif dense:
            rate = self.dense_macs_per_s
        elif kind == "conv" and self.conv_macs_per_s:
            rate = self.conv_macs_per_s
        elif kind == "depthwise" and self.depthwise_macs_per_s:
            rate = self.depthwise_macs_per_s
        else:
            rate = self.macs_per_s
        return max(macs / rate, nbytes / self.bytes_per_s) + calls * self.call_overhead_s


_DEFAULTS = {
    # 2-core x86-64 CPU (the CI machine), float32.
    # conv_macs_per_s: a step mixing channels over a few modes falls off oneDNN's fast paths on
    # torch CPU, and on NumPy it is a GEMM per tap on a strided slice: both far below the
    # matmul rate (`tensorconv bench auto` checks that auto then picks the faster plan).
    # depthwise_macs_per_s: oneDNN's channels-last depthwise convs reuse little per MAC; 1-D ones
    # are bandwidth-bound, which is why one 3x3x3 pass can beat three 1-D passes with a third of
    # the MACs (`tensorconv bench depthwise`).
    "numpy": CostModel(
        macs_per_s=6.0e10, bytes_per_s=8.0e9, call_overhead_s=2.0e-5, dense_macs_per_s=3.0e10, conv_macs_per_s=1.0e10
    ),
    # float64: oneDNN has no float64 kernels and ATen's fallback convs are slower than a tap loop
    # of elementwise ops and GEMMs, so float64 steps run as tap loops (the torch backend's native convs),
    # priced like NumPy's; the dense conv stays ATen's.
    "torch": CostModel(
        macs_per_s=7.0e10,
        bytes_per_s=2.0e10,
        call_overhead_s=2.0e-5,
        dense_macs_per_s=1.0e11,
        conv_macs_per_s=1.0e10,
        native_steps=True,
        dense_slow_macs_per_s=8.0e9,
        depthwise_macs_per_s=3.5e10,
        float64=CostModel(
            macs_per_s=3.0e10,
            bytes_per_s=1.5e10,
            call_overhead_s=2.0e-5,
            dense_macs_per_s=2.0e10,
            conv_macs_per_s=3.0e9,
        ),
    ),
    # a datacenter GPU (H100 class)
    "torch-cuda": CostModel(
        macs_per_s=2.5e13, bytes_per_s=2.5e12, call_overhead_s=1.0e-5, dense_macs_per_s=1.5e13, native_steps=True
    ),
    "cupy": CostModel(macs_per_s=2.5e13, bytes_per_s=2.5e12, call_overhead_s=1.5e-5, dense_macs_per_s=5.0e12),
}


def _key(backend_name, device):
    # a torch.device or a string such as "cuda" / "cuda:0"
    if backend_name == "torch" and device_type(device) == "cuda":
        return "torch-cuda"
    return backend_name


def cost_model_for(backend_name, device=None) -> CostModel:
    key = _key(backend_name, device)
    return _DEFAULTS.get(key) or _DEFAULTS["numpy"]


def calibrate(backend_name="torch", device=None, *, size=1024, repeat=5):
    """Measure matmul throughput and copy bandwidth on a backend.

    Returns a :class:`CostModel` (the backend's default with those rates replaced): pass it to
    ``plan_conv(..., cost_model=model)``. Nothing is installed globally: plans made by others,
    and ``conv()``'s own, keep the defaults.
    """
    from ..backends import backend_for_name

    b = backend_for_name(backend_name)
    a = b.random_normal((size, size), seed=0, dtype="float32", device=device)
    big = b.random_normal((8 * size * size,), seed=1, dtype="float32", device=device)

    def sync():
        if b.name == "torch" and device is not None and getattr(device, "type", "cpu") == "cuda":
            b.xp.cuda.synchronize()
        elif b.name == "cupy":
            b.xp.cuda.Device().synchronize()

    def best(fn):
        fn()
        sync()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_mm = best(lambda: b.matmul(a, a))
    t_cp = best(lambda: big * 1.0)
    small = b.random_normal((8,), seed=2, dtype="float32", device=device)
    t_call = best(lambda: small * 1.0)
    base = cost_model_for(backend_name, device)
    return replace(base, macs_per_s=size**3 / t_mm, bytes_per_s=2 * 4 * big.shape[0] / t_cp, call_overhead_s=t_call)


def dense_peak_bytes(structure, geometry, batch, itemsize, backend_name, device=None):
    """Bytes a dense conv allocates: its output, a padded copy where the conv cannot pad, and
    what the library's conv adds (oneDNN: a reordered input; ATen's float64 CPU conv: an
    im2col buffer; the tap loop of NumPy / CuPy: one product per tap)."""
    g, st = geometry, structure
    c = st.in_channels
    out = batch * st.out_channels * math.prod(g.out_spatial)
    padded = batch * c * math.prod(g.padded_spatial)
    inputs = batch * c * math.prod(g.in_spatial)
    native = backend_for_name(backend_name).native.available(itemsize, device)
    pads = any(p != (0, 0) for p in g.padding)
    if backend_name == "torch" and 1 <= g.n_spatial <= 3:
        copy = padded if pads and (g.padding_mode != "zeros" or not g.is_symmetric_padding) else 0
        if native:
            extra = inputs
        else:
            extra = batch * c * math.prod(g.kernel_size) * math.prod(g.out_spatial)  # im2col of the batch
    else:  # per tap: a contiguous copy of the input slice, the product, the running sum
        copy, extra = (padded if pads else 0), 2 * out + inputs
    return itemsize * (out + copy + extra + math.prod(st.shape))


def steps_peak_bytes(structure, geometry, batch, itemsize, backend_name, device, steps, sizes):
    """Bytes the steps allocate at their peak: one step's input, output and copies (each
    intermediate is freed after the one step that reads it); ``sizes``: index -> size."""
    g = geometry
    native = backend_for_name(backend_name).native.available(itemsize, device)
    weights = sum(math.prod(op.shape) for op in structure.operands)
    peak = 0
    first = True
    for s in steps:
        if s.kind == "weights":
            continue
        ch_in = math.prod(sizes[i] for i in s.lhs_indices)
        live = ch_in * batch * math.prod(s.in_grid) + math.prod(s.out_shape)
        pads = [g.padding[m] for m in s.modes]
        if s.modes and any(p != (0, 0) for p in pads):
            padded = batch * math.prod(d + (sum(g.padding[m]) if m in s.modes else 0) for m, d in enumerate(s.in_grid))
            # a native conv pads symmetric zeros itself; anything else is a padded copy first
            copied = not native or g.padding_mode != "zeros" or any(lo != hi for lo, hi in pads)
            live += ch_in * padded if copied else 0
        elif not s.modes and first and not native:
            live += ch_in * batch * math.prod(s.in_grid)  # the channels-first input copied for a GEMM
        first = False
        peak = max(peak, live)
    return itemsize * (peak + weights)
