"""tensorconv: factorized convolutions of any order, on NumPy, PyTorch and CuPy.

``import tensorconv`` imports neither torch nor cupy; the torch layers (``KruskalConv``,
``TuckerConv``, ``HOCPBlock``) are loaded on first access.
"""

from . import accelerators
from .backends import available_backends, get_backend
from .kernels import KruskalKernel, TuckerKernel
from .plans import ConvPlan, conv, plan_conv
from .tenalg import fold, mode_dot, multi_mode_dot, unfold

__version__ = "0.3.0"

__all__ = [
    "KruskalKernel",
    "TuckerKernel",
    "conv",
    "plan_conv",
    "ConvPlan",
    "get_backend",
    "available_backends",
    "accelerators",
    "mode_dot",
    "multi_mode_dot",
    "unfold",
    "fold",
    "KruskalConv",
    "TuckerConv",
    "HOCPBlock",
    "__version__",
]

_LAZY_TORCH = {"KruskalConv", "TuckerConv", "HOCPBlock"}


def __getattr__(name):
    if name in _LAZY_TORCH:
        from . import nn

        return getattr(nn, name)
    if name in ("nn", "architectures"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tensorconv' has no attribute {name!r}")
