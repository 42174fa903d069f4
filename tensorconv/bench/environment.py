"""The machine and process a run measured: recorded with its rows."""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np


def _set_malloc_no_trim():
    """glibc: never return freed memory to the OS, never mmap big blocks (process-wide; bench only).

    Without it, every large intermediate freed and allocated again costs first-touch page faults.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no glibc to tune
        print("tensorconv bench: glibc's libc.so.6 is not here; the allocator is left as it is", file=sys.stderr)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 2**30) and libc.mallopt(M_TRIM_THRESHOLD, 2**62 - 1)
    return bool(ok)


def environment(args):
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "allocator": args.allocator_note,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        # the accelerators serving the targets' devices, and whether each was usable
        "accelerators": getattr(args, "accelerators_built", None),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:  # read the version without importing it: importing tltorch switches tensorly's global backend
        from importlib.metadata import version

        env["tltorch"] = version("tensorly-torch")
    except Exception:
        pass
    return env


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
