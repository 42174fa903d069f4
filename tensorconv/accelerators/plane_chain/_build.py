"""Building and loading the plane chain's compiled library (``cp_chain_cpu.cpp``).

It is built with ``torch.utils.cpp_extension`` on first use (a C++ compiler and ninja, once per machine: the
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
import re
import warnings

__all__ = ["load", "available", "disabled", "UnsafeBuildDirectory"]

_SOURCE = os.path.join(os.path.dirname(__file__), "cp_chain_cpu.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_state = {}
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
#: written into each build folder as it is made: only folders holding it are ever removed
_MARKER = ".tensorconv-build"
_BUILD_FOLDER = re.compile(r"tensorconv_cp_chain_[0-9a-f]{12}\.build-[A-Za-z0-9_]+")


def _remove_stale_builds(root):
    """Remove the folders of this library's builds that were killed long ago (torch leaves a
    lock file in them). Only what tensorconv made: a folder named as :func:`_build` names them,
    owned by this user, holding the marker file it writes; anything else in ``root`` (which a user
    may point at a folder of their own) is never touched."""
    import shutil
    import time

    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if not _BUILD_FOLDER.fullmatch(entry) or os.path.islink(path) or not os.path.isdir(path):
            continue
        marker = os.path.join(path, _MARKER)
        try:
            st = os.stat(path)
        except OSError:
            continue
        owned = not hasattr(os, "getuid") or st.st_uid == os.getuid()
        stale = time.time() - st.st_mtime > _STALE_BUILD_S
        if owned and stale and os.path.isfile(marker) and not os.path.islink(marker):
            shutil.rmtree(path, ignore_errors=True)


def _build(name, root):
    """Compile into a fresh private folder, then move the library into place.

    Each build has its own folder, so a build killed half-way (torch leaves its ``lock`` file
    behind) never blocks a later one, and a reader sees either no library or a whole one."""
    import shutil
    import tempfile
    import time

    from torch.utils.cpp_extension import load as build

    _remove_stale_builds(root)
    work = tempfile.mkdtemp(prefix=f"{name}.build-", dir=root)  # mode 0700
    try:
        with open(os.path.join(work, _MARKER), "w") as f:
            f.write(f"a build of tensorconv's plane chain, started {time.ctime()}\n")
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
            try:
                module = _import_library(name, path)
            except (ImportError, OSError) as exc:
                # a truncated or foreign file under this library's own name (a killed copy, a
                # cache shared with another architecture): it is tensorconv's file, so rebuild it
                warnings.warn(
                    f"tensorconv: the cached CPU fused kernel {path} could not be loaded "
                    f"({type(exc).__name__}: {str(exc)[:200]}); rebuilding it",
                    RuntimeWarning,
                    stacklevel=3,
                )
                os.remove(path)
                module = _build(name, root)
        else:
            module = _build(name, root)
    except UnsafeBuildDirectory as exc:
        warnings.warn(f"tensorconv: the CPU fused kernel is not loaded: {exc}", RuntimeWarning, stacklevel=3)
        module = None
    except Exception as exc:  # no compiler or ninja, a failed build: the portable path runs instead
        warnings.warn(
            f"tensorconv: the CPU fused kernel could not be built ({type(exc).__name__}: "
            f"{str(exc)[:200]}); strategy='fused' uses torch.compile instead. Its build folder is "
            f"{_build_root()} (TENSORCONV_BUILD_DIR); deleting {_module_name()}/ there forces a fresh build",
            RuntimeWarning,
            stacklevel=3,
        )
        module = None
    _state["module"] = module
    return module


def loaded():
    """The compiled module where this process has loaded it, else None (never builds)."""
    return _state.get("module")


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
