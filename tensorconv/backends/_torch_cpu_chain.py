"""The compiled CPU kernel behind ``strategy="fused"`` for 3-D CP kernels on torch CPU.

``csrc/cp_chain_cpu.cpp`` runs a CP convolution plane by plane along spatial mode 0 (GEMM
C -> R, the three depthwise passes, GEMM R -> T) so the R-channel intermediates stay in cache;
see docs/benchmarks.md for what it gains. It is built with ``torch.utils.cpp_extension`` on
first use (a C++ compiler and ninja; about 30 s on 2 cores, once per machine: torch caches
the build under ``TORCH_EXTENSIONS_DIR``). Without a compiler, or with
``TENSORCONV_NO_CPU_KERNEL=1`` in the environment, :func:`load` returns None and callers run
their portable path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings

__all__ = ["load", "cp_chain_forward"]

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "cp_chain_cpu.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_state = {}
#: target size of one chunk's widest intermediate (a chunk of input planes goes through one GEMM);
#: measured with benchmarks/plane_chain.py, docs/benchmarks.md
CHUNK_BYTES = 1 << 20
log = logging.getLogger("tensorconv")


def _cpu_signature():
    """-march=native code must not be reused on another CPU sharing the same cache directory."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def load():
    """The compiled module, or None where it cannot be built (decided once per process)."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("TENSORCONV_NO_CPU_KERNEL", "") not in ("", "0"):
        _state["module"] = None
        return None
    try:
        from torch.utils.cpp_extension import load as build

        with open(_SOURCE, "rb") as f:
            digest = hashlib.sha1(f.read() + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()
        log.info("tensorconv: loading (or building, once per machine) the CPU fused kernel")
        module = build(name=f"tensorconv_cp_chain_{digest[:12]}", sources=[_SOURCE], extra_cflags=_FLAGS,
                       extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler or ninja, a failed build: the portable path runs instead
        warnings.warn(f"tensorconv: the CPU fused kernel could not be built ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); strategy='fused' uses torch.compile instead", RuntimeWarning,
                      stacklevel=3)
        module = None
    _state["module"] = module
    return module


def planes_per_chunk(x, rank, chunk_bytes=None):
    """Input planes per chunk: as many as keep one chunk's widest intermediate within
    ``chunk_bytes`` (at least one)."""
    b, c, d, h, w = (int(s) for s in x.shape)
    per_plane = h * w * max(rank, c) * x.element_size()
    return max(1, min(d, (chunk_bytes or CHUNK_BYTES) // per_plane))


def cp_chain_forward(x, lam, u_t, u_c, spatial, *, out_spatial, stride, pad_lo, dilation, chunk_bytes=None):
    """``x`` (B, C, D, H, W) -> (B, D', H', W', T) channels-last, or None without the kernel.

    ``spatial`` = (U_0, U_1, U_2), each (K_n, R); zero padding ``pad_lo`` (low side per mode;
    the high side follows from ``out_spatial``)."""
    module = load()
    if module is None:
        return None
    wt = (u_t * lam).t().contiguous()
    chunk = planes_per_chunk(x, int(u_c.shape[1]), chunk_bytes)
    return module.cp_chain_forward(x, u_c.contiguous(), *[u.contiguous() for u in spatial], wt, list(out_spatial),
                                   list(stride), list(pad_lo), list(dilation), chunk)
