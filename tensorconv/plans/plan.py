"""``ConvPlan``: a convolution planned once per shape, then run on any backend.

The problem (:mod:`~tensorconv.plans.problem`) says what is planned, the planner
(:func:`~tensorconv.plans.planner.decide`) what runs, the cost model what it costs; the plan is
what the caller holds: those decisions, the compiled steps, and ``__call__``.
"""

from __future__ import annotations

import functools
import math
from types import MappingProxyType
from typing import Any, Sequence

from .._typing import Array, IntOrTuple, Padding
from ..accelerators import registered as registered_accelerators
from ..backends import get_backend
from ..kernels import KruskalKernel, TuckerKernel
from . import report
from .cache import PlanCache
from .cost import CostModel, dense_peak_bytes, steps_peak_bytes
from .executor import Reconstruction, compile_steps, dense_conv
from .planner import decide
from .problem import ConvProblem, check_arrays, kernel_arrays, problem_for
from .structure import structure_of, weight_arrays
from .traced import rebuilt_when_traced, traced_conv, traced_geometry
from .workspace import step_buffers, workspace_for

__all__ = ["ConvPlan", "plan_conv", "conv"]


class ConvPlan:
    """A planned convolution. Call it as ``plan(x, kernel)``.

    Attributes
    ----------
    problem : :class:`~tensorconv.plans.problem.ConvProblem`
        What was planned (``structure``, ``input_shape``, ``geometry``, ``batch``, ``itemsize``
        are its fields, repeated here).
    decision : :class:`~tensorconv.plans.planner.Decision`
        What the planner chose.
    strategy : str
        ``"factorized"``, ``"reconstructed"``, ``"fused"`` or ``"dense"`` (what runs;
        ``requested`` is what was asked for, e.g. ``"auto"``).
    order : str or None
        Factorized plans: ``"fewest-macs"`` (the paper's separable chain; what ``"factorized"``
        and ``"fused"`` run) or ``"fastest"`` (``"auto"`` only: the cost model's fastest
        factorized order, which may merge spatial factors into one multi-mode depthwise step).
    accelerators : tuple of str
        Fused plans: the accelerators (:mod:`tensorconv.accelerators`) asked in turn for each
        call, e.g. ``("torch_compile", "tiles")`` after any compiled kernel; the first that takes
        the call runs it, and where none does the plan runs ``steps``. ``auto`` lists only the
        one whose cost it chose.
    accelerator : str or None
        The first of ``accelerators`` (None for plans that run their steps).
    steps : tuple of :class:`~tensorconv.plans.planner.Step`
    programs : tuple
        One ``(kind, program)`` per step (``"weights"`` or ``"act"``): what runs it.
    sizes : mapping
        Every index of the steps (channels, rank, taps) -> its size.
    path : tuple of tuples
        The contraction order in opt_einsum's linear format (factorized plans).
    macs : int
        Multiply-adds that touch the activation per call.
    min_macs : int
        The fewest activation multiply-adds of any factorized order (the paper's count, e.g.
        ``out_voxels x R x (C + T + sum K)`` for a CP kernel); ``dense_macs / min_macs`` is the
        MAC ratio. Equals ``macs`` unless ``order == "fastest"`` merged factors.
    weight_macs : int
        Multiply-adds on the weights alone (folding lambda, merging factors, reconstructing).
    dense_macs : int
        The dense convolution's multiply-adds.
    peak_bytes : int
        Estimated peak memory of the intermediates (activation-sized arrays and the kernel).
    estimates : mapping
        Cost-model seconds of each strategy considered.
    seconds : float
        The cost model's seconds for one call of what runs (the estimate ``auto`` chose by).
    """

    def __init__(self, problem: ConvProblem):
        self.problem = problem
        st, g = problem.structure, problem.geometry
        self.structure, self.geometry = st, g
        self.input_shape, self.batched, self.batch = problem.input_shape, problem.batched, problem.batch
        self.itemsize, self.backend_name, self.device = problem.itemsize, problem.backend_name, problem.device
        self.requested, self.cost_model = problem.strategy, problem.cost_model
        self.decision = d = decide(problem)
        self.strategy, self.order, self.steps, self.path = d.strategy, d.order, d.steps, d.path
        self.estimates, self.seconds = d.estimates, d.seconds
        self.dense_macs, self.min_macs = d.dense_step.macs, d.min_macs
        self.sizes = MappingProxyType(st.index_sizes(g.kernel_size))
        self.output_shape = ((self.batch,) if self.batched else ()) + (st.out_channels,) + tuple(g.out_spatial)
        self.accelerators = tuple(a.name for a in d.accelerators)
        self.accelerator = self.accelerators[0] if d.accelerators else None
        #: backend name -> this plan compiled whole by that backend (or None): one entry per library
        self._whole, self._reconstruct = {}, None
        self.programs = ()
        if self.strategy in ("factorized", "fused"):
            self.programs = compile_steps(st, g, self.steps, self.batch, self.sizes)
            self._buffers = step_buffers(self.steps, 1 + len(st.operands), self.itemsize)
            final = self.steps[-1].out_indices
            self._final_perm = None
            if tuple(final) != tuple(st.act_out):
                n = st.n_spatial
                self._final_perm = tuple(range(1 + n)) + tuple(1 + n + final.index(i) for i in st.act_out)
            self.macs = sum(s.macs for s in self.steps if s.kind != "weights")
            self.weight_macs = sum(s.macs for s in self.steps if s.kind == "weights")
            self._runners = [a.runner(self) for a in d.accelerators]
            # what the first accelerator allocates where it counts that, else the steps
            args = (st, g, self.batch, self.itemsize, self.backend_name, self.device)
            first = d.accelerators[0].peak_bytes(*args) if d.accelerators else None
            self.peak_bytes = steps_peak_bytes(*args, self.steps, self.sizes) if first is None else first
        else:
            self._runners = []
            self.macs, self.weight_macs, self._groups = self.dense_macs, 0, st.groups
            if self.strategy == "reconstructed":
                self._reconstruct = Reconstruction(st, self.sizes)
                self._groups, self.weight_macs = self._reconstruct.groups, d.reconstruct_macs
            self.peak_bytes = dense_peak_bytes(st, g, self.batch, self.itemsize, self.backend_name, self.device)

    def size_of(self, indices) -> int:
        """The product of the sizes of ``indices`` (e.g. a step's ``out_indices``)."""
        return math.prod(self.sizes[i] for i in indices)

    # -- execution ---------------------------------------------------------------------------------
    def check_call(self, x, kernel):
        """The backend of ``x`` and ``kernel``, once they are checked against this plan."""
        backend = check_arrays(x, kernel)
        if tuple(int(s) for s in x.shape) != self.input_shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but this plan was made for input shape {self.input_shape}")
        key = structure_of(kernel, self.structure.groups).key
        if key != self.structure.key:
            raise ValueError(f"the kernel's structure {key} differs from the one planned for {self.structure.key}")
        return backend

    def __call__(self, x, kernel):
        return self._run(self.check_call(x, kernel), x, kernel)

    def _run(self, backend, x, kernel):
        """:meth:`_execute`, as one compiled program where the backend compiles whole functions."""
        try:
            run = self._whole[backend.name]
        except KeyError:
            run = self._whole[backend.name] = backend.runtime.compile_plan(functools.partial(self._execute, backend))
        return self._execute(backend, x, kernel) if run is None else run(x, kernel)

    def _execute(self, backend, x, kernel):
        """Run on arguments already checked against this plan (see :meth:`check_call`)."""
        if not self.batched:
            x = x[None]
        arrays = weight_arrays(kernel, self.structure, backend)
        if self.programs:
            out = self._run_factorized(backend, x, arrays)
        else:
            g = self.geometry
            weight = kernel if self._reconstruct is None else self._reconstruct(backend, arrays)
            out = dense_conv(
                backend,
                x,
                weight,
                stride=g.stride,
                dilation=g.dilation,
                groups=self._groups,
                padding=g.padding,
                padding_mode=g.padding_mode,
            )
        return out if self.batched else out[0]

    def activation(self, backend, x):
        """x (B, C, *D) as the steps hold it: channels last, C split into the kernel's input indices."""
        act = backend.moveaxis(x, 1, -1)
        st = self.structure
        if len(st.act_in) > 1:
            act = backend.reshape(act, tuple(act.shape[:-1]) + tuple(self.sizes[i] for i in st.act_in))
        return act

    def run_steps(self, backend, x, arrays, timer=None):
        """The steps in turn on x (B, C, *D) and the kernel's arrays (structure's order), all but the
        last into this thread's buffers where allowed (:mod:`.workspace`); returns the last step's
        output (B, *D', its indices) for :meth:`finish`. ``timer(j, thunk)`` may wrap step j."""
        tensors = [self.activation(backend, x)] + list(arrays)
        first_result = len(tensors)
        space = workspace_for(backend, x) if any(self._buffers) and backend.runtime.reuses_buffers(x, arrays) else None
        for j, (step, (kind, prog), buffer) in enumerate(zip(self.steps, self.programs, self._buffers)):
            a, b = tensors[step.lhs], tensors[step.rhs]
            for i in (step.lhs, step.rhs):
                if i >= first_result:  # each intermediate is read by one step: let it go after that
                    tensors[i] = None
            kw = {} if space is None or buffer is None else {"out": space.buffer(*buffer, like=x)}
            run = functools.partial(prog, backend, a, b, **kw)
            tensors.append(run() if timer is None else timer(j, run))
            del a, b, run  # (the partial holds the inputs too)
        return tensors[-1]

    def _run_factorized(self, backend, x, arrays):
        for run in self._runners:
            out = run(backend, x, arrays)
            if out is not None:
                return out
        return self.finish(backend, self.run_steps(backend, x, arrays))

    def finish(self, backend, out):
        """The last step's output (B, *D', its indices) as the conv's (B, T, *D')."""
        st = self.structure
        if self._final_perm is not None:
            out = backend.permute(out, self._final_perm)
        n = st.n_spatial
        if len(st.act_out) != 1:
            out = backend.reshape(out, tuple(out.shape[: 1 + n]) + (st.out_channels,))
        return backend.moveaxis(out, -1, 1)

    # -- reporting ----------------------------------------------------------------------------------
    def profile(self, x, kernel, *, repeat=5, sync=None):
        """Median seconds of each step (factorized plans) or of the whole call (fused, dense)."""
        return report.profile(self, x, kernel, repeat=repeat, sync=sync)

    def describe(self):
        """A table of the steps: primitive, modes, indices summed, output shape, MACs, bytes."""
        return report.describe(self)

    def __repr__(self):
        return (
            f"ConvPlan(strategy={self.strategy!r}, input_shape={self.input_shape}, "
            f"output_shape={self.output_shape}, macs={self.macs:,}, dense_macs={self.dense_macs:,})"
        )


#: conv()'s plans, private to conv() (plan_conv hands out new plans). A group is the accelerator
#: registry (a tuple of the registered objects: a plan cached before ``accelerators.unregister``,
#: or a re-registration under the same name, is not reused) and the kernel's structure.
_conv_plans = PlanCache(ConvPlan)


def plan_conv(
    kernel_or_shape: KruskalKernel | TuckerKernel | Array | tuple[int, ...],
    input_shape: tuple[int, ...],
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    strategy: str = "auto",
    dtype: Any = None,
    backend: str | None = None,
    device: Any = None,
    cost_model: CostModel | None = None,
    accelerators: Sequence[str] | None = None,
) -> ConvPlan:
    """Plan a convolution once; the caller holds the plan and calls it for every input of
    this shape (opt_einsum's ``contract_expression`` model).

    Each call returns a new :class:`ConvPlan`: what one caller's plan compiles or caches (a
    jitted program, a compiled chain, prepared native convs) is never seen by another.
    :func:`conv` keeps its own bounded cache of plans (per kernel structure its 256 most recent
    shapes, 4096 in all), which no caller can reach.

    Parameters
    ----------
    kernel_or_shape : KruskalKernel, TuckerKernel, dense array, or a dense kernel shape tuple
    input_shape : tuple
        (B, C, *spatial) or unbatched (C, *spatial).
    stride, padding, dilation, groups, padding_mode : as ``torch.nn.ConvNd``
        ``padding`` may also be per-mode (low, high) pairs, ``"same"`` or ``"valid"``.
    strategy : {"auto", "factorized", "reconstructed", "fused"}
        ``"factorized"``: the fewest-MAC order of the factors; ``"reconstructed"``: rebuild the
        dense kernel, one dense conv; ``"fused"``: the factorized steps fused (torch.compile on
        torch, cache-sized tiles elsewhere); ``"auto"``: the cheapest by the backend's cost
        model of those two orders and the cost model's fastest factorized order.
    dtype : the dtype the plan will run in (sizes the byte counts); default: the kernel's, or
        float32 for a kernel given by its shape
    backend, device : whose cost model prices the steps (the plan runs on any backend);
        default: the kernel's arrays' library and device, or NumPy for a shape
    cost_model : CostModel, optional
        Price the steps with this model (e.g. from :func:`tensorconv.plans.calibrate`) instead
        of the backend's default. Nothing is set globally.
    accelerators : sequence of str, optional
        Which registered accelerators (:mod:`tensorconv.accelerators`) the plan may use, by
        name; default: all. ``auto`` weighs those that are ready here (built before);
        ``strategy="fused"`` asks those that apply, in priority order. ``()``: none (``auto``
        chooses among the library's own orders; ``fused`` runs the steps unfused).

    Examples
    --------
    >>> from tensorconv import KruskalKernel, plan_conv
    >>> k = KruskalKernel.random((64, 64, 3, 3, 3), rank=64, seed=0)
    >>> plan = plan_conv(k, (8, 64, 16, 32, 32), padding=1, strategy="factorized")
    >>> plan.macs == 8 * 16 * 32 * 32 * 64 * (64 + 64 + 3 + 3 + 3)
    True
    """
    return ConvPlan(
        problem_for(
            kernel_or_shape,
            input_shape,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
            strategy=strategy,
            dtype=dtype,
            backend=backend,
            device=device,
            cost_model=cost_model,
            accelerators=accelerators,
        )
    )


def conv(
    x: Array,
    kernel: KruskalKernel | TuckerKernel | Array,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    strategy: str = "auto",
) -> Array:
    """N-D convolution (cross-correlation, as torch) of ``x`` with a dense or factorized kernel.

    Parameters
    ----------
    x : array (B, C, *spatial) or (C, *spatial), numpy, torch or cupy
    kernel : dense array (T, C/groups, *K), :class:`KruskalKernel` or :class:`TuckerKernel`
        on the same backend as ``x``.
    stride, padding, dilation, groups, padding_mode, strategy : see :func:`plan_conv`

    Returns
    -------
    array of x's backend, (B, T, *out) — output sizes as ``torch.nn.ConvNd``.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorconv import KruskalKernel, conv
    >>> k = KruskalKernel.random((4, 3, 3, 3), rank=2, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    >>> y = conv(x, k, padding="same")
    >>> y.shape
    (2, 4, 8, 8)
    >>> bool(np.allclose(y, conv(x, k.to_dense(), padding="same")))
    True
    """
    arrays = kernel_arrays(kernel) or [kernel]
    backend = get_backend(x, *arrays)
    runtime = backend.runtime
    cast = runtime.autocast_dtype(x)
    if cast is not None:
        # under torch.autocast a conv computes in the autocast dtype and returns it (nn.ConvNd does):
        # input and kernel are cast once, and every step then runs in that dtype
        if backend.dtype(x) != cast or backend.dtype(arrays[0]) != cast:
            kernel = (
                kernel.astype(cast)
                if isinstance(kernel, (KruskalKernel, TuckerKernel))
                else backend.astype(kernel, cast)
            )
            x = backend.astype(x, cast)
        with runtime.autocast_off(x):
            return conv(
                x,
                kernel,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                padding_mode=padding_mode,
                strategy=strategy,
            )
    check_arrays(x, kernel, backend)

    def plan_for(shape, accelerators=None):  # looked up by the kernel's structure and the shape
        problem = problem_for(
            structure_of(kernel, groups),
            shape,
            stride=stride,
            padding=padding,
            dilation=dilation,
            padding_mode=padding_mode,
            strategy=strategy,
            dtype=backend.itemsize(x),
            backend=backend.name,
            device=backend.device(x),
            accelerators=accelerators,
        )
        return _conv_plans.get((registered_accelerators(), problem.structure), (problem,))

    tracer = runtime.tracer()
    if tracer is not None:
        # a plan is chosen per input shape in Python, which a tracer would freeze to the shape it
        # saw: it records the shape-generic form of the steps instead (or one opaque op)
        geometry = traced_geometry(x, kernel, stride, padding, dilation, padding_mode, strategy)
        rebuild = rebuilt_when_traced(runtime, tracer, x, kernel, strategy, plan_for)
        return traced_conv(backend, tracer, x, kernel, groups=groups, rebuild=rebuild, **geometry)
    plan = plan_for(tuple(int(d) for d in x.shape))
    # the arrays were checked above: nothing is left for the plan to re-check
    return plan._run(backend, x, kernel)
