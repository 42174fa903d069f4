"""The compiled CPU kernel behind ``strategy="fused"`` for CP kernels on torch CPU.

``csrc/cp_chain_cpu.cpp`` runs a 3-D CP convolution plane by plane along spatial mode 0 (GEMM
C -> R, the three depthwise passes, GEMM R -> T) so the R-channel intermediates stay in cache,
and its backward (stride 1) the same way; 1-D and 2-D convs come with unit modes inserted
(plans/fused.py). See docs/benchmarks.md for what it gains. It is built with
``torch.utils.cpp_extension`` on first use (a C++ compiler and ninja, once per machine: the
build is kept under ``~/.cache/tensorconv``, or ``TENSORCONV_BUILD_DIR``). Without a compiler,
or with ``TENSORCONV_NO_CPU_KERNEL=1`` in the environment, :func:`load` returns None and callers run
their portable path. ``strategy="auto"`` considers the kernel only once it is built
(:func:`available`): it never makes a conv call wait for a compiler.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings

__all__ = ["load", "available", "disabled", "planes_per_chunk", "forward_bytes", "cp_chain_forward", "reference_chain"]

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "cp_chain_cpu.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_state = {}
#: target size of one chunk's widest intermediate (a chunk of input planes goes through one GEMM):
#: small enough that a chunk's buffers stay in a core's cache. A chunk's fixed cost is the
#: barriers of the team of threads (``benchmarks/plane_chain.py overhead``), small enough that
#: small chunks need no batching; the size was chosen with ``benchmarks/plane_chain.py``.
CHUNK_BYTES = 128 << 10
log = logging.getLogger("tensorconv")


def _cpu_signature():
    """-march=native code must not be reused on another CPU sharing the same cache directory."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _module_name():
    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha1(f.read() + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()
    return f"tensorconv_cp_chain_{digest[:12]}"


def disabled():
    """``TENSORCONV_NO_CPU_KERNEL`` set (to anything but 0): the kernel is never built or used."""
    return os.environ.get("TENSORCONV_NO_CPU_KERNEL", "") not in ("", "0")


def _build_root():
    """Where builds are kept: ``TENSORCONV_BUILD_DIR``, else ``~/.cache/tensorconv``."""
    return os.environ.get("TENSORCONV_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tensorconv")


class UnsafeBuildDirectory(RuntimeError):
    """A build folder or library that another user could have written: never loaded."""


def _check_private(path, what):
    """``path`` must belong to this user and be writable by no one else: whoever can write a
    library there runs code in every process that loads it."""
    st = os.stat(path)
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if st.st_uid != uid:
        raise UnsafeBuildDirectory(
            f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {uid}); "
            f"tensorconv loads only libraries it built itself. Set TENSORCONV_BUILD_DIR to a "
            f"folder of your own"
        )
    if st.st_mode & 0o022:
        raise UnsafeBuildDirectory(
            f"{what} {path} is writable by other users (mode {oct(st.st_mode & 0o777)}); "
            f"anyone could plant a library there. Run chmod go-w on it, or set "
            f"TENSORCONV_BUILD_DIR to a private folder"
        )


def _private_dir(path):
    os.makedirs(path, mode=0o700, exist_ok=True)
    _check_private(path, "build folder")
    return path


def _library_path(name=None):
    name = name or _module_name()
    return os.path.join(_build_root(), name, name + ".so")


def _import_library(name, path):
    import importlib.util

    import torch  # noqa: F401  (the extension links against libtorch, which must be loaded first)

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_STALE_BUILD_S = 3600


def _build(name, root):
    """Compile into a fresh private folder, then move the library into place.

    Each build has its own folder, so a build killed half-way (torch leaves its ``lock`` file
    behind) never blocks a later one, and a reader sees either no library or a whole one."""
    import shutil
    import tempfile
    import time

    from torch.utils.cpp_extension import load as build

    for old in os.listdir(root):  # folders of builds killed long ago
        path = os.path.join(root, old)
        if ".build-" in old and time.time() - os.path.getmtime(path) > _STALE_BUILD_S:
            shutil.rmtree(path, ignore_errors=True)
    work = tempfile.mkdtemp(prefix=f"{name}.build-", dir=root)  # mode 0700
    try:
        log.info("tensorconv: building the CPU fused kernel (once per machine) in %s", work)
        module = build(
            name=name,
            sources=[_SOURCE],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=work,
            verbose=False,
        )
        final = _private_dir(os.path.join(root, name))
        os.replace(os.path.join(work, name + ".so"), os.path.join(final, name + ".so"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return module


def load():
    """The compiled module, or None where it cannot be built (decided once per process).

    A library built before (same source, flags and CPU: they are in its name) is imported as it
    is, without a compiler; otherwise it is built. Only a library in a folder of this user's
    that no one else can write is ever loaded."""
    if "module" in _state:
        return _state["module"]
    if disabled():
        _state["module"] = None
        return None
    try:
        name = _module_name()
        root = _private_dir(_build_root())
        path = _library_path(name)
        if os.path.exists(path):
            _check_private(os.path.dirname(path), "build folder")
            _check_private(path, "library")
            module = _import_library(name, path)
        else:
            module = _build(name, root)
    except UnsafeBuildDirectory as exc:
        warnings.warn(f"tensorconv: the CPU fused kernel is not loaded: {exc}", RuntimeWarning, stacklevel=3)
        module = None
    except Exception as exc:  # no compiler or ninja, a failed build: the portable path runs instead
        warnings.warn(
            f"tensorconv: the CPU fused kernel could not be built ({type(exc).__name__}: "
            f"{str(exc)[:200]}); strategy='fused' uses torch.compile instead",
            RuntimeWarning,
            stacklevel=3,
        )
        module = None
    _state["module"] = module
    return module


def planes_per_chunk(shape, rank, itemsize, chunk_bytes=None, out_channels=None):
    """Input planes per chunk for an input of ``shape`` (B, C, D, H, W) (at least one): as many
    as keep one chunk's widest intermediate within ``chunk_bytes`` (default :data:`CHUNK_BYTES`).
    ``out_channels`` (T) widens the intermediate where it exceeds C and R."""
    _, c, d, h, w = (int(s) for s in shape)
    t = c if out_channels is None else int(out_channels)
    per_plane = h * w * max(rank, c, t) * itemsize
    return max(1, min(d, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // per_plane))


def forward_bytes(shape, rank, itemsize, *, out_channels, out_spatial, kernel0, dilation0, threads):
    """Bytes the kernel's forward allocates for an input of ``shape`` (B, C, D, H, W): the
    channels-last output and each thread's (or the team's) scratch of one chunk of planes
    (``chain_scratch`` in csrc/cp_chain_cpu.cpp: C -> R rows, mode-2 rows, the ring, the output rows)."""
    b, c, d, h, w = (int(v) for v in shape)
    do, ho, wo = (int(v) for v in out_spatial)
    g = planes_per_chunk(shape, rank, itemsize, out_channels=out_channels)
    slots = (kernel0 - 1) * dilation0 + 1 + g - 1
    per_image_threads = threads > 1 and b >= threads
    team = threads > 1 and not per_image_threads
    scratch = rank * (g * h * w + (2 if team else 1) * g * h * wo + slots * ho * wo + ho * wo + threads)
    sets = threads if per_image_threads else 1
    return itemsize * (b * do * ho * wo * out_channels + sets * scratch)


def available():
    """Whether :func:`load` would return the kernel without building it (loaded, or built
    here before): ``strategy="auto"`` only considers the kernel then."""
    if "module" in _state:
        return _state["module"] is not None
    if "built" not in _state:  # looked up once per process: plan_conv asks on every call
        # the source's hash is in the name: a library built from an older source is not this one, so an
        # upgrade makes auto leave the kernel out until it is built (never a compile inside a conv call)
        _state["built"] = not disabled() and os.path.exists(_library_path())
    return _state["built"]


def cp_chain_forward(x, lam, u_t, u_c, spatial, *, out_spatial, stride, pad_lo, dilation, chunk_bytes=None):
    """``x`` (B, C, D, H, W) -> (B, D', H', W', T) channels-last, or None without the kernel.

    ``spatial`` = (U_0, U_1, U_2), each (K_n, R); zero padding ``pad_lo`` (low side per mode;
    the high side follows from ``out_spatial``). Differentiable (through :func:`_function`)
    where ``stride`` is 1 in every mode; for a strided conv the caller must not need gradients."""
    module = load()
    if module is None:
        return None
    geo = (tuple(out_spatial), tuple(stride), tuple(pad_lo), tuple(dilation), chunk_bytes)
    import torch

    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lam, u_t, u_c, *spatial)):
        return _function().apply(x, lam, u_t, u_c, *spatial, geo)
    return _run_forward(module, x, lam, u_t, u_c, spatial, geo)  # nothing to record: no Function's overhead


def _folded_output_factor(u_t, lam):
    """(R, T): U_T with lambda folded in, as the kernel's backward takes it."""
    return (u_t * lam).t().contiguous()


def _run_forward(module, x, lam, u_t, u_c, spatial, geo):
    out_spatial, stride, pad_lo, dilation, chunk_bytes = geo
    chunk = planes_per_chunk(x.shape, int(u_c.shape[1]), x.element_size(), chunk_bytes, int(u_t.shape[0]))
    # lambda folded and the factors laid out in C++ (cheaper there than five torch ops here)
    return module.cp_chain_forward_kruskal(
        x, lam, u_t, u_c, *spatial, list(out_spatial), list(stride), list(pad_lo), list(dilation), chunk
    )


def reference_chain(x, lam, u_t, u_c, u0, u1, u2, geo):
    """What the kernel computes, in differentiable torch ops (stride 1, zero padding): x (B, C,
    D, H, W) -> (B, D', H', W', T). Used for higher-order gradients, which the kernel lacks."""
    import torch
    import torch.nn.functional as F

    out_spatial, _, pad_lo, dilation, _ = geo
    h = torch.einsum("bcdhw,cr->brdhw", x, u_c)
    rank = int(lam.shape[0])
    for m, u in enumerate((u0, u1, u2)):
        k = int(u.shape[0])
        hi = out_spatial[m] + dilation[m] * (k - 1) - h.shape[2 + m] - pad_lo[m]
        pads = [0, 0] * 3
        pads[2 * (2 - m)], pads[2 * (2 - m) + 1] = pad_lo[m], hi
        h = F.pad(h, pads)
        shape = [rank, 1, 1, 1, 1]
        shape[2 + m] = k
        dil = [1, 1, 1]
        dil[m] = dilation[m]
        h = F.conv3d(h, u.t().reshape(shape), None, 1, 0, tuple(dil), rank)
    return torch.einsum("brdhw,tr->bdhwt", h, u_t * lam)


def _function():
    """The autograd Function around the kernel (made once: torch is imported lazily)."""
    if "function" in _state:
        return _state["function"]
    import torch

    class CpChain(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lam, u_t, u_c, u0, u1, u2, geo):
            ctx.geo = geo
            ctx.save_for_backward(x, lam, u_t, u_c, u0, u1, u2)
            return _run_forward(_state["module"], x, lam, u_t, u_c, (u0, u1, u2), geo)

        @staticmethod
        def backward(ctx, grad):
            x, lam, u_t, u_c, u0, u1, u2 = ctx.saved_tensors
            _, stride, pad_lo, dilation, _ = ctx.geo
            if any(s != 1 for s in stride):  # pragma: no cover - cp_chain_3d never asks
                raise RuntimeError("the plane chain's backward needs stride 1")
            if torch.is_grad_enabled():
                # backward(create_graph=True): higher-order gradients through the same chain in plain torch ops
                inputs = (x, lam, u_t, u_c, u0, u1, u2)
                with torch.enable_grad():
                    out = reference_chain(*inputs, ctx.geo)
                wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
                got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
                return tuple(next(got) if need else None for need in ctx.needs_input_grad[:7]) + (None,)
            wt = _folded_output_factor(u_t, lam)
            gx, duc, du0, du1, du2, dwt = _state["module"].cp_chain_backward(
                x,
                u_c.contiguous(),
                u0.contiguous(),
                u1.contiguous(),
                u2.contiguous(),
                wt,
                grad.contiguous(),
                list(pad_lo),
                list(dilation),
                bool(ctx.needs_input_grad[0]),
            )
            gx = gx.permute(0, 4, 1, 2, 3) if ctx.needs_input_grad[0] else None
            dwt_t = dwt.t()  # (T, R): the gradient of U_T * lambda
            return gx, (dwt_t * u_t).sum(0), dwt_t * lam, duc, du0, du1, du2, None

    _state["function"] = CpChain
    return CpChain
