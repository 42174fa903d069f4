"""torchvision's model definitions where its compiled ops cannot load.

The registry's torchvision wheels are built for the CUDA torch; with the CPU torch,
``import torchvision`` fails in ``torchvision._meta_registrations``, which registers fake kernels
for C ops (``torchvision::nms`` ...) that its library did not define for this torch. The model
definitions use none of those ops: that one module is replaced by an empty one, and everything
else imported is torchvision's own code. Used by ``tensorconv bench models`` and the tests.
"""

from __future__ import annotations

import importlib
import sys
import types


def torchvision_models():
    """``torchvision.models``; raises ImportError where torchvision is not installed."""
    try:
        return importlib.import_module("torchvision.models")
    except ImportError:
        raise
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    return importlib.import_module("torchvision.models")
