"""Backends: one small class per array library, found from the arrays' types.

``get_backend(*arrays)`` looks at ``type(x).__module__`` only, so it never imports a
framework the caller has not already imported; the result is cached per type. Mixing
libraries in one call is a ``TypeError`` (as array-api-compat's ``array_namespace``).

Primitive set (see :class:`tensorconv.backends._base.ArrayBackend`):

========================  ===============================================================
``einsum``, ``tensordot``  contractions (1x1 convolutions, n-mode products)
``moveaxis``, ``reshape``  layout changes (views where the library allows)
``pad`` / ``pad_axis``     zeros, reflect, replicate, circular
``to_numpy``/``from_numpy`` conversion that keeps dtype (and the ``like`` array's device)
========================  ===============================================================

A library's own convolutions sit beside the primitives, behind their own interface:
``backend.native`` (:class:`tensorconv.backends._native.NativeConvs`: ``available``,
``channels_last``, ``dense``); libraries without fast ones (NumPy, CuPy) have none, and the
plans loop over the kernel's taps there.
"""

from __future__ import annotations

from typing import Any

from ._base import PADDING_MODES, ArrayBackend, device_type

__all__ = [
    "get_backend",
    "backend_for_name",
    "ArrayBackend",
    "BACKEND_NAMES",
    "PADDING_MODES",
    "available_backends",
    "device_type",
]

BACKEND_NAMES = ("numpy", "torch", "cupy", "jax")
# the first part of an array type's module -> backend name (jax arrays live in jaxlib, tracers in jax)
_MODULE_ROOTS = {"numpy": "numpy", "torch": "torch", "cupy": "cupy", "jax": "jax", "jaxlib": "jax"}
_by_name: dict = {}
_by_type: dict = {}
_on_load: dict = {}


def on_load(name: str, hook) -> None:
    """Call ``hook(backend)`` once the backend ``name`` is created (at once if it exists): how
    the core teaches a library about its own types (JAX pytrees) without importing it."""
    if name in _by_name:
        hook(_by_name[name])
    else:
        _on_load.setdefault(name, []).append(hook)


def backend_for_name(name: str) -> ArrayBackend:
    """The backend called ``name`` (imports that library on first use)."""
    if isinstance(name, ArrayBackend):
        return name
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend={name!r} is not one of {BACKEND_NAMES}")
    if name not in _by_name:
        if name == "numpy":
            from ._numpy import NumpyBackend as cls
        elif name == "torch":
            from ._torch import TorchBackend as cls
        elif name == "jax":
            from ._jax import JaxBackend as cls
        else:
            from ._cupy import CupyBackend as cls
        _by_name[name] = backend = cls()
        for array_type in backend.array_types():
            # known before any look-up: a tracer (torch.compile) then reads one dict entry instead
            # of tracing the first look-up's parsing of a module name
            _by_type[array_type] = backend
        for hook in _on_load.pop(name, ()):
            hook(_by_name[name])
    return _by_name[name]


def _backend_of_type(cls) -> ArrayBackend | None:
    try:
        return _by_type[cls]
    except KeyError:
        pass
    root = _MODULE_ROOTS.get((cls.__module__ or "").split(".")[0])
    backend = backend_for_name(root) if root is not None else None
    if root == "jax":
        import jax  # already imported: an instance of one of its types exists

        if not issubclass(cls, (jax.Array, jax.core.Tracer)):
            backend = None  # another jax object (a PRNG key type, a config), not an array
    _by_type[cls] = backend
    return backend


def get_backend(*arrays: Any) -> ArrayBackend:
    """The backend of ``arrays`` (``None`` entries are ignored).

    Raises
    ------
    TypeError
        If an argument is not an array of a supported library, or if arrays of different
        libraries are mixed.

    Examples
    --------
    >>> import numpy as np
    >>> get_backend(np.zeros(3), np.ones(2)).name
    'numpy'
    """
    found = None
    found_type = None
    for x in arrays:
        if x is None:
            continue
        backend = _backend_of_type(type(x))
        if backend is None:
            raise TypeError(
                f"expected arrays of one of {BACKEND_NAMES}, got an object of type "
                f"{type(x).__module__}.{type(x).__qualname__}"
            )
        if found is None:
            found, found_type = backend, type(x)
        elif backend is not found:
            raise TypeError(
                f"arrays from different libraries cannot be mixed: got "
                f"{found_type.__module__}.{found_type.__qualname__} ({found.name}) and "
                f"{type(x).__module__}.{type(x).__qualname__} ({backend.name}); convert one "
                f"side first (e.g. KruskalKernel.to_backend)"
            )
    if found is None:
        raise TypeError("get_backend() needs at least one array")
    return found


def available_backends(include_gpu: bool = True) -> list[str]:
    """Names of the backends whose library imports here (``torch-cuda`` when a GPU is visible)."""
    import importlib.util

    names = ["numpy"]
    if importlib.util.find_spec("torch") is not None:
        names.append("torch")
        if include_gpu:
            import torch

            if torch.cuda.is_available():
                names.append("torch-cuda")
    if importlib.util.find_spec("jax") is not None:
        names.append("jax")
    if include_gpu and importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                names.append("cupy")
        except Exception:  # no driver / no device: cupy is importable but unusable
            pass
    return names
