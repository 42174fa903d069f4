"""Accelerators: optional kernels that run a whole factorized plan, behind one small interface.

The plans never name an accelerator. A plan asks the registry which accelerators can run it
(:meth:`Accelerator.applies`), which are usable now without building anything
(:meth:`Accelerator.ready`), what each would cost (:meth:`Accelerator.seconds`) and allocate
(:meth:`Accelerator.peak_bytes`), and, where it runs one, for a runner
(:meth:`Accelerator.runner`). ``strategy="auto"`` weighs an accelerator only once it is ready
(a conv call never waits for a compiler); ``strategy="fused"`` asks for one by name of the
strategy, and builds it on first use.

The built-in one is :mod:`tensorconv.accelerators.plane_chain` (a compiled CPU kernel for CP
convolutions on torch). The torch.compile and tiled runners of ``strategy="fused"``
(:mod:`tensorconv.plans.fused`) implement the same interface, without a cost (they are never
chosen by ``auto``). A third party adds one with :func:`register`, or installs a package that
names its class in the entry-point group ``tensorconv.accelerators``::

    [project.entry-points."tensorconv.accelerators"]
    my_kernel = "my_package.kernel:MyAccelerator"

The built-in ones are the folders of this package, each naming its class ``ACCELERATOR``
(a new one is one new folder); all load on the first look-up. The registry
also says which accelerators serve a device (:func:`for_device`): a layer under
``torch.compile`` records its plan as one opaque op only where one does, and ``tensorconv
bench`` builds and benchmarks those of the devices it runs on.

Examples
--------
>>> from tensorconv import accelerators
>>> [a.name for a in accelerators.registered()][:1]
['plane_chain']
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable

from ..backends import device_type

__all__ = ["Accelerator", "register", "unregister", "registered", "get", "build", "for_device", "ENTRY_POINT_GROUP"]

#: the generic runners of ``strategy="fused"``, as entry points name their class. The compiled
#: accelerators that ship with tensorconv are found as folders here (each one's ``ACCELERATOR``):
#: a new one is one new folder. All load on the first look-up (``import tensorconv`` stays
#: light), before those that other packages declare.
_BUILTIN = (
    "tensorconv.plans.fused:TorchCompileRunner",
    "tensorconv.plans.fused:TiledRunner",
)
ENTRY_POINT_GROUP = "tensorconv.accelerators"


class Accelerator:
    """What a plan asks of an accelerator. Subclass it and :func:`register` an instance.

    Every method but :meth:`runner` and :meth:`build` is answered from shapes alone (no
    arrays): plans are made before any array exists.
    """

    #: unique, used in ``plan.accelerator`` and by :func:`unregister`
    name: str = ""
    #: the label of its estimate in ``plan.estimates`` (``"fused (<label>)"``)
    label: str = ""
    #: ``auto`` takes it only where its estimate times this margin beats every other plan
    #: (a cost model fitted on a few shapes must be clearly ahead to replace a plain plan)
    margin: float = 1.0
    #: which requests it serves: ``"auto"`` (chosen by its cost, only when :meth:`seconds` is
    #: not None) and / or ``"fused"`` (asked for by name; runs whenever it applies)
    serves: tuple[str, ...] = ("auto", "fused")
    #: plans ask accelerators in this order (lowest first; ties in registration order): compiled
    #: kernels before the generic runners of ``strategy="fused"`` (100)
    priority: int = 50
    #: one line for ``plan.describe()``
    summary: str = ""

    def applies(self, structure: Any, geometry: Any = None) -> bool:
        """Whether it can run a kernel of this structure (a
        :class:`~tensorconv.plans.structure.KernelStructure`) with this geometry at all;
        ``geometry`` is None where the input shape is not known yet."""
        raise NotImplementedError

    def serves_device(self, backend_name: str, device_type: str | None) -> bool:
        """Whether it runs arrays of this library on this kind of device at all (built or not);
        ``device_type``: e.g. ``"cpu"``, ``"cuda"``, or None where the library has no devices."""
        return False

    def ready(self, backend_name: str, device: Any, itemsize: int) -> bool:
        """Whether it runs on this backend / device / dtype now, without building anything."""
        return False

    def seconds(self, structure: Any, geometry: Any, batch: int, itemsize: int, model: Any) -> float | None:
        """Estimated seconds of one call (``model``: the plan's :class:`~tensorconv.plans.CostModel`),
        or None (``auto`` never picks it)."""
        return None

    def peak_bytes(
        self, structure: Any, geometry: Any, batch: int, itemsize: int, backend_name: str, device: Any
    ) -> int | None:
        """Bytes one call allocates on this backend / device, or None (the plan counts its own
        steps instead)."""
        return None

    def runner(self, plan: Any) -> Callable[..., Any]:
        """``run(backend, x, arrays)`` for this plan: x channels first (B, C, *D), ``arrays``
        the kernel's arrays in the plan's order; returns the output channels first (B, T, *D'),
        or None where it declines this call (the plan's own steps run). By default
        ``run(spec(plan), backend, x, arrays)``."""
        spec = self.spec(plan)
        return lambda backend, x, arrays: self.run(spec, backend, x, arrays)

    def spec(self, plan: Any) -> Any:
        """What :meth:`run` needs of this plan, worked out once per plan (a call at small
        channel counts is short enough for per-call Python to show), e.g. its geometry as
        constants."""
        return None

    def run(self, spec: Any, backend: Any, x: Any, arrays: Any) -> Any:
        """One call from a :meth:`spec` (same contract as the runner's)."""
        raise NotImplementedError

    def build(self) -> bool:
        """Build (or load) whatever it needs now; True if it is usable here."""
        return True

    def release_buffers(self) -> int:
        """Free what it keeps from call to call for the calling thread (scratch it reuses);
        returns the bytes freed. :func:`tensorconv.plans.free_workspace` calls it."""
        return 0

    def status(self) -> str:
        """One line on whether it is usable here, and if not why."""
        return "ready"

    def __repr__(self) -> str:
        return f"<accelerator {self.name}>"


_registry: dict[str, Accelerator] = {}
_loaded = []
#: the registry in priority order, kept beside it: conv() asks for it on every auto call
_ordered: list[tuple[Accelerator, ...]] = [()]


#: (backend name, device type, request) -> the accelerators that serve it; emptied on every change
_by_device: dict[tuple, tuple[Accelerator, ...]] = {}


def _reorder() -> None:
    _ordered[0] = tuple(sorted(_registry.values(), key=lambda a: a.priority))
    _by_device.clear()


def _instantiate(spec: str, origin: str) -> Accelerator | None:
    module, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
        return obj() if isinstance(obj, type) else obj
    except Exception as exc:  # a broken plug-in must not break every plan
        warnings.warn(f"tensorconv: accelerator {spec!r} ({origin}) could not be loaded: {exc}", RuntimeWarning)
        return None


def _load_builtin() -> None:
    if _loaded:
        return
    _loaded.append(True)
    found = [
        (f"{__name__}.{module.name}:ACCELERATOR", "built in")
        for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
        if module.ispkg
    ]
    found += [(spec, "built in") for spec in _BUILTIN]
    found += [
        (ep.value, f"entry point {ep.name!r} of {ENTRY_POINT_GROUP}") for ep in entry_points(group=ENTRY_POINT_GROUP)
    ]
    for spec, origin in found:
        accelerator = _instantiate(spec, origin)
        if accelerator is None:
            continue
        if accelerator.name in _registry:
            if origin != "built in" and _registry[accelerator.name].__class__ is not accelerator.__class__:
                warnings.warn(
                    f"tensorconv: accelerator {spec!r} ({origin}) is named {accelerator.name!r}, "
                    f"which is registered already; not loaded",
                    RuntimeWarning,
                )
            continue
        register(accelerator)


def register(accelerator: Accelerator) -> Accelerator:
    """Add ``accelerator`` to the registry (plans made from then on ask it).

    Plans ask accelerators by :attr:`~Accelerator.priority`: the first whose runner takes a
    call runs it."""
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"accelerator={accelerator!r} is not an instance of tensorconv.accelerators.Accelerator")
    if not accelerator.name:
        raise ValueError("an accelerator needs a non-empty name")
    if accelerator.name in _registry and _registry[accelerator.name] is not accelerator:
        raise ValueError(f"an accelerator named {accelerator.name!r} is registered already; unregister it first")
    _registry[accelerator.name] = accelerator
    _reorder()
    return accelerator


def unregister(name: str) -> Accelerator:
    """Remove the accelerator called ``name`` and return it."""
    _load_builtin()
    if name not in _registry:
        raise ValueError(f"no accelerator named {name!r}; registered: {sorted(_registry)}")
    accelerator = _registry.pop(name)
    _reorder()
    return accelerator


def get(name: str) -> Accelerator:
    """The registered accelerator called ``name``."""
    _load_builtin()
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"no accelerator named {name!r}; registered: {sorted(_registry)}") from None


def registered() -> tuple[Accelerator, ...]:
    """The registered accelerators, in the order plans ask them."""
    _load_builtin()
    return _ordered[0]


def for_device(backend_name: str, device: Any = None, request: str = "auto") -> tuple[Accelerator, ...]:
    """The registered accelerators that serve ``request`` (``"auto"`` or ``"fused"``) for arrays
    of ``backend_name`` on ``device`` (a device, its type such as ``"cpu"``, or None), in the
    order plans ask them; built or not (:meth:`Accelerator.ready` says whether one is now)."""
    kind = device_type(device)
    key = (backend_name, kind, request)
    found = _by_device.get(key)
    if found is None:
        found = _by_device[key] = tuple(
            a for a in registered() if request in a.serves and a.serves_device(backend_name, kind)
        )
    return found


def build() -> dict[str, bool]:
    """Build (or load) every registered accelerator now, so that ``strategy="auto"`` may use
    them; returns whether each one is usable here (its :meth:`~Accelerator.status` says why
    not). ``tensorconv build-kernel`` and ``tensorconv bench`` call it."""
    return {acc.name: acc.build() for acc in registered()}
