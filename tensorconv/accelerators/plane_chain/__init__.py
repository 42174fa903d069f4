"""The plane chain: a compiled CPU kernel for CP convolutions on torch (see README.md here).

It runs a whole CP convolution of 1-3 spatial modes plane by plane along spatial mode 0 (GEMM
C -> R, the depthwise passes with a ring of planes for the mode-0 taps, GEMM R -> T), so the
R-channel intermediates stay in cache and only the input and the output touch main memory; its
backward (stride 1) runs the same way. 1-D and 2-D convs run with unit modes inserted.
"""

from __future__ import annotations

import functools
import glob
import math
import os
from dataclasses import dataclass

from ...backends import device_type
from ...plans import workspace
from ...plans.cost import MODEL_MARGIN
from .. import Accelerator, get
from . import _build
from ._geometry import as_3d, forward_bytes, planes_per_chunk

__all__ = ["PlaneChain", "PLANE_CHAIN", "ChainRates"]


#: the most taps per mode whose weights the kernel's depthwise passes keep in vector registers
#: (taps_run in cp_chain_cpu.cpp)
MAX_REGISTER_TAPS = 7


@dataclass(frozen=True)
class ChainRates:
    """The kernel's own rates (float32; float64 has its own), next to the plan's cost model."""

    depthwise_macs_per_s: float  # its depthwise passes while a chunk's planes stay in cache
    # passes of more than MAX_REGISTER_TAPS taps: those past the first run in a loop that
    # reads and writes the output once per tap
    long_depthwise_macs_per_s: float = 0.0
    # a chunk's working set beyond which its passes stream memory; None: a share of this
    # machine's last-level cache (_cache_bytes)
    cache_bytes: int | None = None
    chunk_s: float = 1.0e-6  # fixed cost per chunk of planes (fitted when a chunk cost the team a barrier)
    # its GEMMs run one chunk of planes at a time: with fewer rows (positions) than this their
    # blocking falls apart (small late-layer planes at high rank), and the GEMM rate drops in
    # proportion; fitted on r3d_18's layers (`tensorconv bench layers`)
    gemm_full_rows: int = 400


#: measured on the project's 2-core x86-64 CPUs (``tensorconv bench accelerators`` and ``layers``)
RATES = {
    4: ChainRates(depthwise_macs_per_s=2.0e10, long_depthwise_macs_per_s=3.5e9),
    8: ChainRates(depthwise_macs_per_s=1.0e10, long_depthwise_macs_per_s=1.75e9),
}


@functools.lru_cache(maxsize=1)
def _cache_bytes():
    """The share of the last-level cache a chunk's planes may fill and stay there: 3/8 of it
    (the rest is the input and output streaming past, and the other core), at most 32 MiB (no
    larger working set was measured); 12 MiB where the size cannot be read (Linux sysfs)."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append((level, int(text.rstrip("KMG")) * scale))
        except ValueError:
            continue
    if not sizes:
        return 12 << 20
    return min(32 << 20, 3 * max(sizes)[1] // 8)


def _on_torch_cpu(backend_name, device):
    return backend_name == "torch" and (device is None or device_type(device) == "cpu")


class PlaneChain(Accelerator):
    """CP kernels (one factor per mode, none identity, taps <= 64 per mode), 1-3 spatial modes,
    torch CPU tensors of float32 / float64. ``auto`` weighs it once the library is built."""

    name = "plane_chain"
    label = "plane chain"
    margin = MODEL_MARGIN  # its rates were fitted on a few shapes
    priority = 10
    summary = "on torch CPU one compiled plane-by-plane kernel (with gradients: stride 1)"

    def applies(self, structure, geometry=None):
        n = structure.n_spatial
        if structure.kind != "kruskal" or not 1 <= n <= 3:
            return False
        if any(k > 64 for k in structure.shape[2:]):  # the kernel's tap tables hold 64
            return False
        return structure.factor_modes == tuple((m,) for m in range(2 + n)) and not any(structure.identity_factors)

    def serves_device(self, backend_name, device_type):
        return _on_torch_cpu(backend_name, device_type)

    def ready(self, backend_name, device, itemsize):
        return _on_torch_cpu(backend_name, device) and itemsize in RATES and _build.available()

    def _shape(self, structure, geometry, batch):
        return (batch, structure.in_channels) + as_3d(geometry.in_spatial, 1)

    def seconds(self, structure, geometry, batch, itemsize, model):
        """Its two GEMMs at the model's matmul rate over the input and output alone (the
        intermediates stay in cache), its depthwise passes at its own rate, one call, and a
        fixed cost per chunk of planes."""
        rates = RATES.get(itemsize)
        if rates is None:
            return None
        sizes = structure.size_of
        c, r, t = sizes["s"], sizes["r"], sizes["t"]
        (d, h, w), (do, ho, wo) = as_3d(geometry.in_spatial, 1), as_3d(geometry.out_spatial, 1)
        k0, k1, k2 = as_3d(geometry.kernel_size, 1)
        chunk_planes = planes_per_chunk(self._shape(structure, geometry, batch), r, itemsize, out_channels=t)
        out_planes = max(1, chunk_planes // geometry.stride[0])
        in_rows = min(1.0, chunk_planes * h * w / rates.gemm_full_rows)
        out_rows = min(1.0, out_planes * ho * wo / rates.gemm_full_rows)
        # the GEMMs' MACs weighted by how far below full rate their row blocks run
        gemm_macs = batch * (d * h * w * c * r / in_rows + do * ho * wo * r * t / out_rows)
        per_pass = (d * h * wo * k2, d * ho * wo * k1, do * ho * wo * k0)
        depthwise_macs = batch * r * sum(p for p, k in zip(per_pass, (k2, k1, k0)) if k <= MAX_REGISTER_TAPS)
        long_macs = batch * r * sum(p for p, k in zip(per_pass, (k2, k1, k0)) if k > MAX_REGISTER_TAPS)
        nbytes = itemsize * batch * (d * h * w * c + do * ho * wo * t)
        chunks = batch * -(-d // chunk_planes)
        passes = depthwise_macs / rates.depthwise_macs_per_s
        if long_macs:
            passes += long_macs / (rates.long_depthwise_macs_per_s or rates.depthwise_macs_per_s)
        span = (k0 - 1) * geometry.dilation[0] + 1
        if itemsize * chunk_planes * h * w * r * (4 + span) > (rates.cache_bytes or _cache_bytes()):
            # a chunk's planes (GEMM output, two passes, the ring, the GEMM input) no longer fit in
            # cache: each pass streams them (about 5 reads / writes per input voxel, K0 + 2 per output)
            pass_bytes = itemsize * batch * r * (5 * d * h * w + (k0 + 2) * do * ho * wo)
            passes = max(passes, pass_bytes / model.bytes_per_s)
        return model.seconds(gemm_macs, nbytes, calls=1) + chunks * rates.chunk_s + passes

    def peak_bytes(self, structure, geometry, batch, itemsize, backend_name, device):
        if not _on_torch_cpu(backend_name, device):
            return None
        import torch

        out = forward_bytes(
            self._shape(structure, geometry, batch),
            structure.size_of["r"],
            itemsize,
            out_channels=structure.out_channels,
            out_spatial=as_3d(geometry.out_spatial, 1),
            kernel=as_3d(geometry.kernel_size, 1),
            dilation=as_3d(geometry.dilation, 1),
            threads=torch.get_num_threads(),
        )
        if geometry.padding_mode != "zeros":  # the input is padded by a copy first
            out += itemsize * batch * structure.in_channels * math.prod(geometry.padded_spatial)
        return out

    def spec(self, plan):
        """The kernel's geometry as constants."""
        g = plan.geometry
        pad_lo = tuple(lo for lo, _ in g.padding) if g.padding_mode == "zeros" else (0,) * len(g.kernel_size)
        pre_pad = (
            None
            if g.padding_mode == "zeros"
            else tuple((2 + m, lo, hi) for m, (lo, hi) in enumerate(g.padding) if (lo, hi) != (0, 0))
        )
        return (
            len(g.kernel_size),
            tuple(g.out_spatial),
            as_3d(g.out_spatial, 1),
            as_3d(g.stride, 1),
            as_3d(pad_lo, 0),
            as_3d(g.dilation, 1),
            g.padding_mode,
            pre_pad,
        )

    def run(self, spec, backend, x, arrays):
        """One call, or None where it declines: not torch CPU float32/64, under torch.func
        transforms or jit tracing (they see through plain torch ops only), or gradients needed
        at a stride other than 1 (its backward is written for stride 1)."""
        if backend.name != "torch":
            return None
        torch = backend.xp
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return None
        if torch._C._are_functorch_transforms_active() or torch.jit.is_tracing():
            return None
        n, out_spatial, out3, stride, pad_lo, dilation, padding_mode, pre_pad = spec
        lam, u_t, u_c, *spatial = arrays
        if any(s != 1 for s in stride) and torch.is_grad_enabled() and any(t.requires_grad for t in (x, *arrays)):
            return None
        from ._ops import cp_chain_forward

        if pre_pad is not None:
            x = backend.pad(x, {axis: (lo, hi) for axis, lo, hi in pre_pad}, padding_mode)
        if n < 3:
            x = x.reshape(tuple(x.shape[:2]) + as_3d(x.shape[2:], 1))
            spatial = as_3d(spatial, lam.new_ones((1, lam.shape[0])))
        out = cp_chain_forward(
            x,
            lam,
            u_t,
            u_c,
            spatial,
            out_spatial=out3,
            stride=stride,
            pad_lo=pad_lo,
            dilation=dilation,
            out=workspace.output_buffer(backend, x, arrays, (x.shape[0], *out3, u_t.shape[0])),
        )
        if out is None:
            return None
        if n < 3:
            out = out.reshape((out.shape[0],) + out_spatial + (out.shape[-1],))
        return out.movedim(-1, 1)

    def build(self):
        return _build.load() is not None

    def release_buffers(self):
        module = _build.loaded()
        return 0 if module is None else int(module.release_kept_scratch())

    def status(self):
        if _build.disabled():
            return "off (TENSORCONV_NO_CPU_KERNEL is set)"
        if "module" in _build._state:
            return "ready" if _build._state["module"] is not None else "not available here (see the warning above)"
        return "built, loads on first use" if _build.available() else "not built (tensorconv build-kernel builds it)"


#: what the registry loads from this folder
ACCELERATOR = PlaneChain


def __getattr__(name):
    # the registered instance (the registry makes it, from the class, on its first look-up)
    if name == "PLANE_CHAIN":
        return get(PlaneChain.name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
