"""``ConvPlan``: a convolution planned once per shape, then run on any backend."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import opt_einsum

from .._typing import Array, IntOrTuple, Padding
from ..accelerators import registered as registered_accelerators
from ..backends import backend_for_name, get_backend
from ..kernels import KruskalKernel, TuckerKernel
from .cache import PlanCache
from .cost import CostModel, cost_model_for
from .executor import TapProgram, WeightProduct, dense_conv
from .planner import STRATEGIES, dense_step, plan_steps, reconstruct_macs
from .spec import make_geometry
from .structure import KernelStructure, structure_of, weight_arrays

__all__ = ["ConvPlan", "plan_conv", "conv"]


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


_ITEMSIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex64": 8, "complex128": 16}


def _itemsize(dtype):
    """Bytes per element of ``dtype`` (a name, a numpy / torch dtype, or an itemsize in bytes)."""
    if dtype is None:
        return 4
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype not in (2, 4, 8, 16):
            raise ValueError(f"dtype={dtype!r} as an itemsize must be 2, 4, 8 or 16 bytes")
        return dtype
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
    if name not in _ITEMSIZES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_ITEMSIZES)}")
    return _ITEMSIZES[name]


def _check_shape(shape, name="input_shape"):
    """A tuple of ints from ``shape``; floats, bools and negative sizes are errors, never truncated."""
    try:
        entries = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints, got {shape!r}") from None
    out = []
    for v in entries:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"{name}={shape!r} must hold ints, got {v!r} ({type(v).__name__})")
        v = int(v.__index__())
        if v < 0:
            raise ValueError(f"{name}={shape!r} has a negative size {v}")
        out.append(v)
    return tuple(out)


def _kernel_arrays(kernel):
    if isinstance(kernel, KruskalKernel):
        return [kernel.weights] + [f for f in kernel.factors if f is not None]
    if isinstance(kernel, TuckerKernel):
        return [kernel.core] + [f for f in kernel.factors if f is not None]
    if isinstance(kernel, (tuple, KernelStructure)):
        return []  # a dense kernel's shape, or a planned structure: no arrays
    return [kernel]


def _check_arrays(x, kernel, backend=None):
    """The backend of x and every array of the kernel (one library, one dtype, or an error);
    ``backend``: theirs, where the caller has looked it up already."""
    arrays = [x] + (_kernel_arrays(kernel) or [kernel])
    backend = backend or get_backend(*arrays)
    ref = arrays[1]
    for name, a in (("x", x), ("the kernel", ref)):
        if not backend.is_inexact(a):
            # integer products would wrap around silently (int8: 540000 -> 96); torch's conv refuses them too
            raise TypeError(
                f"{name} has dtype {backend.dtype_name(a)}: convolutions need a floating (or complex) "
                f"dtype; convert it first, e.g. x.astype('float32') / x.float()"
            )
    if backend.dtype(x) != backend.dtype(ref):
        raise TypeError(
            f"x has dtype {backend.dtype_name(x)} but the kernel has dtype {backend.dtype_name(ref)}; "
            f"convert one of them (nothing is cast implicitly)"
        )
    return backend


#: auto takes the merged-depthwise order only where the model puts it clearly ahead of the
#: paper's plain order: its rates were fitted on 16x32x32 planes, and on r3d_18's deep layers
#: (thousands of rank components, 7x7 planes) it ran slower than the plain order that the model
#: had put just behind it (`tensorconv bench r3d18`). Accelerators carry their own margin.
_FASTEST_ORDER_MARGIN = 1.07


class ConvPlan:
    """A planned convolution. Call it as ``plan(x, kernel)``.

    Attributes
    ----------
    strategy : str
        ``"factorized"``, ``"reconstructed"``, ``"fused"`` or ``"dense"`` (what runs;
        ``requested`` is what was asked for, e.g. ``"auto"``).
    order : str or None
        Factorized plans: ``"fewest-macs"`` (the paper's separable chain; what ``"factorized"``
        and ``"fused"`` run) or ``"fastest"`` (``"auto"`` only: the cost model's fastest
        factorized order, which may merge spatial factors into one multi-mode depthwise step).
    accelerators : tuple of str
        Fused plans: the accelerators (:mod:`tensorconv.accelerators`) asked in turn for each
        call, e.g. ``("torch_compile", "tiles")`` after any compiled kernel; the first that takes the call
        runs it, and where none does the plan runs ``steps``. ``auto`` lists only the one whose
        cost it chose.
    accelerator : str or None
        The first of ``accelerators`` (None for plans that run their steps).
    steps : list of :class:`~tensorconv.plans.planner.Step`
    path : list of tuples
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
    estimates : dict
        Cost-model seconds of each strategy considered.
    """

    def __init__(
        self,
        structure,
        input_shape,
        geometry,
        *,
        batched,
        strategy,
        itemsize,
        backend_name="numpy",
        device=None,
        cost_model=None,
        ready_accelerators=(),
        allowed_accelerators=None,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
        self.structure = structure
        self.input_shape = tuple(input_shape)
        self.geometry = geometry
        self.batched = batched
        self.requested = strategy
        self.itemsize = itemsize
        self.backend_name = backend_name
        self.device = device
        batch = self.input_shape[0] if batched else 1
        self.batch = batch
        self.cost_model = cost_model or cost_model_for(backend_name, device)
        model = self.cost_model.for_itemsize(itemsize)
        self._dense_step = dense_step(structure, geometry, batch, itemsize, model)
        self.dense_macs = self._dense_step.macs
        self.estimates = {}
        #: backend name -> this plan compiled whole by that backend (or None): one entry per library
        self._whole = {}
        self._factorized = None
        self._accelerators = None  # None: all that serve "fused" (asked for by name)
        self._allowed = allowed_accelerators
        self.order = None
        self.min_macs = self.dense_macs
        if structure.kind == "dense":
            chosen = "dense"
        else:
            steps, path, _ = plan_steps(structure, geometry, batch, itemsize, model, objective="macs")
            self._factorized = (steps, path)
            self.min_macs = sum(s.macs for s in steps if s.kind != "weights")
            self._reconstruct_macs = reconstruct_macs(structure)
            self.estimates["factorized"] = sum(s.seconds for s in steps)
            self.estimates["reconstructed"] = self._dense_step.seconds + model.seconds(
                self._reconstruct_macs, itemsize * _prod(structure.shape)
            )
            chosen = strategy
            self.order = "fewest-macs"
            if strategy == "auto":
                # the fastest factorized order by the cost model may merge spatial factors (one
                # multi-mode depthwise conv: more MACs, fewer passes over memory)
                fast_steps, fast_path, _ = plan_steps(structure, geometry, batch, itemsize, model, objective="seconds")
                if fast_path != path:
                    self.estimates["factorized, fastest order"] = sum(s.seconds for s in fast_steps)
                margins = {"factorized, fastest order": _FASTEST_ORDER_MARGIN}
                candidates = {}
                for acc in registered_accelerators():
                    if acc.name in ready_accelerators and acc.applies(structure, geometry):
                        secs = acc.seconds(structure, geometry, batch, itemsize, model)
                        if secs is not None:
                            label = f"fused ({acc.label or acc.name})"
                            self.estimates[label], margins[label], candidates[label] = secs, acc.margin, acc
                chosen = min(self.estimates, key=lambda name: self.estimates[name] * margins.get(name, 1.0))
                self._accelerators = []
                if chosen in candidates:
                    # an accelerator computes the fewest-MAC order, so the plan's steps (what describe()
                    # counts, and what runs where it declines a call) are that order
                    self._accelerators = [candidates[chosen]]
                    chosen = "fused"
                if chosen == "factorized, fastest order":
                    chosen, self.order = "factorized", "fastest"
                    self._factorized = (fast_steps, fast_path)
            if chosen == "reconstructed":
                self.order = None
        self.strategy = chosen
        out_spatial = geometry.out_spatial
        self.output_shape = ((batch,) if batched else ()) + (structure.out_channels,) + tuple(out_spatial)
        self._compile()

    # -- compilation -----------------------------------------------------------------------------
    def _compile(self):
        st = self.structure
        g = self.geometry
        sizes = dict(st.size_of)
        sizes.update({t: k for t, k in zip(st.taps, g.kernel_size)})
        self._sizes = sizes
        if self.strategy in ("factorized", "fused"):
            steps, self.path = self._factorized
            self.steps = steps
            self._programs = []
            for step in steps:
                if step.kind == "weights":
                    self._programs.append(
                        ("weights", WeightProduct(step.lhs_indices, step.rhs_indices, step.out_indices, sizes))
                    )
                else:
                    taps = {i: st.taps.index(i) for i in step.rhs_indices if i in st.taps}
                    prog = TapProgram(
                        step.lhs_indices,
                        step.rhs_indices,
                        step.out_indices,
                        taps,
                        step.in_grid,
                        step.out_grid,
                        self.batch,
                        sizes,
                        kernel_size=g.kernel_size,
                        stride=g.stride,
                        dilation=g.dilation,
                        padding=g.padding,
                        padding_mode=g.padding_mode,
                    )
                    self._programs.append(("act", prog))
            final = steps[-1].out_indices
            self._final_perm = None
            if tuple(final) != tuple(st.act_out):
                n = st.n_spatial
                self._final_perm = tuple(range(1 + n)) + tuple(1 + n + final.index(i) for i in st.act_out)
            self.macs = sum(s.macs for s in steps if s.kind != "weights")
            self.weight_macs = sum(s.macs for s in steps if s.kind == "weights")
            # asked for by name, fused asks every accelerator that serves it (compiled kernels, then
            # torch.compile or tiles); auto never waits for a compiler: only the one it priced, if any
            accs = self._accelerators
            if self.strategy != "fused":
                accs = []
            elif accs is None:
                accs = [
                    a
                    for a in registered_accelerators()
                    if "fused" in a.serves and a.applies(st, g) and (self._allowed is None or a.name in self._allowed)
                ]
            self._accelerators = accs
            self._runners = [a.runner(self) for a in accs]
            self.accelerators = tuple(a.name for a in accs)
            self.accelerator = self.accelerators[0] if accs else None
            self.peak_bytes = self._peak_factorized(steps)
        else:
            self._accelerators, self._runners, self.accelerators, self.accelerator = [], [], (), None
            self.path = []
            self.steps = [self._dense_step]
            self.macs = self.dense_macs
            self.weight_macs = 0
            self._reconstruct = None
            if self.strategy == "reconstructed":
                shared = [i for i in st.act_out if i in st.act_in]
                self._groups = _prod(sizes[i] for i in shared)
                dense_ind = tuple(st.act_out) + tuple(i for i in st.act_in if i not in shared) + tuple(st.taps)
                letters = {
                    i: c
                    for i, c in zip(
                        dict.fromkeys([i for op in st.operands for i in op.indices] + list(dense_ind)),
                        "abcdefghijklmnopqrstuvwxyz",
                    )
                }
                eq = (
                    ",".join("".join(letters[i] for i in op.indices) for op in st.operands)
                    + "->"
                    + "".join(letters[i] for i in dense_ind)
                )
                self._reconstruct = opt_einsum.contract_expression(eq, *[op.shape for op in st.operands])
                self._dense_shape = (st.out_channels, st.in_channels // self._groups) + tuple(g.kernel_size)
                self.weight_macs = self._reconstruct_macs
            else:
                self._groups = st.groups
            self.peak_bytes = self._peak_dense()

    def _peak_dense(self):
        """Bytes a dense conv allocates: its output, a padded copy where the conv cannot pad, and
        what the library's conv adds (oneDNN: a reordered input; ATen's float64 CPU conv: an
        im2col buffer; the tap loop of NumPy / CuPy: one product per tap)."""
        g, st = self.geometry, self.structure
        c = st.in_channels
        out = self.batch * st.out_channels * _prod(g.out_spatial)
        padded = self.batch * c * _prod(g.padded_spatial)
        inputs = self.batch * c * _prod(g.in_spatial)
        backend = backend_for_name(self.backend_name)
        native = backend.native_conv_expected(self.itemsize, self.device)
        pads = any(p != (0, 0) for p in g.padding)
        if self.backend_name == "torch" and 1 <= g.n_spatial <= 3:
            copy = padded if pads and (g.padding_mode != "zeros" or not g.is_symmetric_padding) else 0
            if native:
                extra = inputs
            else:
                extra = self.batch * c * _prod(g.kernel_size) * _prod(g.out_spatial)  # im2col of the batch
        else:  # per tap: a contiguous copy of the input slice, the product, the running sum
            copy, extra = (padded if pads else 0), 2 * out + inputs
        return self.itemsize * (out + copy + extra + _prod(st.shape))

    def _sizes_product(self, indices):
        return _prod(self._sizes[i] for i in indices)

    def _peak_factorized(self, steps):
        """Bytes the runner allocates at its peak: one step's input, output and copies (each
        intermediate is freed after the one step that reads it), or the first accelerator's buffers."""
        g = self.geometry
        backend = backend_for_name(self.backend_name)
        for acc in self._accelerators[:1]:
            counted = acc.peak_bytes(self.structure, g, self.batch, self.itemsize, self.backend_name, self.device)
            if counted is not None:
                return counted
        native = backend.native_conv_expected(self.itemsize, self.device)
        weights = sum(_prod(op.shape) for op in self.structure.operands)
        peak = 0
        first = True
        for s in steps:
            if s.kind == "weights":
                continue
            ch_in = _prod(self._sizes[i] for i in s.lhs_indices)
            live = ch_in * self.batch * _prod(s.in_grid) + _prod(s.out_shape)
            pads = [g.padding[m] for m in s.modes]
            if s.modes and any(p != (0, 0) for p in pads):
                padded = self.batch * _prod(
                    d + (sum(g.padding[m]) if m in s.modes else 0) for m, d in enumerate(s.in_grid)
                )
                # a native conv pads symmetric zeros itself; anything else is a padded copy first
                copied = not native or g.padding_mode != "zeros" or any(lo != hi for lo, hi in pads)
                live += ch_in * padded if copied else 0
            elif not s.modes and first and not native:
                live += ch_in * self.batch * _prod(s.in_grid)  # the channels-first input copied for a GEMM
            first = False
            peak = max(peak, live)
        return self.itemsize * (peak + weights)

    # -- execution ---------------------------------------------------------------------------------
    def _check_call(self, x, kernel):
        backend = _check_arrays(x, kernel)
        if tuple(int(s) for s in x.shape) != self.input_shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but this plan was made for input shape {self.input_shape}")
        key = structure_of(kernel, self.structure.groups).key
        if key != self.structure.key:
            raise ValueError(f"the kernel's structure {key} differs from the one planned for {self.structure.key}")
        return backend

    def __call__(self, x, kernel):
        return self._run(self._check_call(x, kernel), x, kernel)

    def _run(self, backend, x, kernel):
        """:meth:`_execute`, as one compiled program where the backend compiles whole functions."""
        try:
            run = self._whole[backend.name]
        except KeyError:
            run = self._whole[backend.name] = backend.compile_plan(functools.partial(self._execute, backend))
        return self._execute(backend, x, kernel) if run is None else run(x, kernel)

    def _execute(self, backend, x, kernel):
        """Run on arguments already checked against this plan (see :meth:`_check_call`)."""
        if not self.batched:
            x = x[None]
        arrays = weight_arrays(kernel, self.structure, backend)
        if self.strategy in ("factorized", "fused"):
            out = self._run_factorized(backend, x, arrays)
        else:
            g = self.geometry
            if self._reconstruct is not None:
                weight = backend.reshape(self._reconstruct(*arrays), self._dense_shape)
            else:
                weight = kernel
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
        """x (B, C, *D) as the plans hold it: channels last, C split into the kernel's input indices."""
        act = backend.moveaxis(x, 1, -1)
        st = self.structure
        if len(st.act_in) > 1:
            act = backend.reshape(act, tuple(act.shape[:-1]) + tuple(self._sizes[i] for i in st.act_in))
        return act

    def _run_steps(self, backend, x, arrays, timer=None):
        """The plan's steps one after another; ``timer(j, thunk)`` may wrap step j (profiling)."""
        tensors = [self.activation(backend, x)] + list(arrays)
        first_result = len(tensors)
        for j, (step, (kind, prog)) in enumerate(zip(self.steps, self._programs)):
            a, b = tensors[step.lhs], tensors[step.rhs]
            for i in (step.lhs, step.rhs):
                if i >= first_result:  # each intermediate is read by one step: let it go after that
                    tensors[i] = None
            if timer is None:
                tensors.append(prog(backend, a, b))
            else:
                tensors.append(timer(j, lambda a=a, b=b: prog(backend, a, b)))
            del a, b
        return tensors[-1]

    def _run_factorized(self, backend, x, arrays):
        for run in self._runners:
            out = run(backend, x, arrays)
            if out is not None:
                return out
        return self._finish(backend, self._run_steps(backend, x, arrays))

    def _finish(self, backend, out):
        """The last step's output (B, *D', its indices) as the conv's (B, T, *D')."""
        st = self.structure
        if self._final_perm is not None:
            out = backend.permute(out, self._final_perm)
        n = st.n_spatial
        if len(st.act_out) != 1:
            out = backend.reshape(out, tuple(out.shape[: 1 + n]) + (st.out_channels,))
        return backend.moveaxis(out, -1, 1)

    def profile(self, x, kernel, *, repeat=5, sync=None):
        """Median seconds of each step (factorized plans) or of the whole dense call."""
        import time

        sync = sync or (lambda: None)
        backend = self._check_call(x, kernel)
        whole = self.strategy != "factorized"  # fused and dense plans are timed as a whole
        per_step = [[] for _ in ([None] if whole else self.steps)]

        def timer(j, run):
            sync()
            t0 = time.perf_counter()
            out = run()
            sync()
            per_step[j].append(time.perf_counter() - t0)
            return out

        batched_x = x if self.batched else x[None]
        arrays = weight_arrays(kernel, self.structure, backend)
        for _ in range(repeat + 1):  # the first round warms up and is dropped
            if whole:
                timer(0, lambda: self._execute(backend, x, kernel))
            else:
                self._run_steps(backend, batched_x, arrays, timer)
        return [sorted(t[1:])[len(t[1:]) // 2] for t in per_step]

    # -- reporting ----------------------------------------------------------------------------------
    def describe(self):
        """A table of the steps: primitive, modes, indices summed, output shape, MACs, bytes."""
        names = ["x"] + [op.name for op in self.structure.operands]
        lines = [
            f"ConvPlan: {self.structure.kind} kernel {self.structure.shape}, input {self.input_shape} -> "
            f"output {self.output_shape}",
            f"  strategy: {self.strategy}"
            + (f", {self.order} order" if self.order else "")
            + f" (requested {self.requested})"
            + (
                ", estimates: " + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in self.estimates.items())
                if self.estimates
                else ""
            ),
            f"  geometry: stride={self.geometry.stride} padding={self.geometry.padding} "
            f"dilation={self.geometry.dilation} padding_mode={self.geometry.padding_mode}",
        ]
        if self._accelerators:
            said = "; ".join(f"{a.name}: {a.summary}" if a.summary else a.name for a in self._accelerators)
            lines.append(f"  fused: {said}; otherwise the steps below, unfused")
        lines += [
            "",
            f"  {'#':>2}  {'primitive':<10} {'operands':<22} {'modes':<8} {'summed':<14} {'output shape':<26} "
            f"{'MACs':>15} {'bytes':>13}",
        ]
        ids = list(names)
        for k, s in enumerate(self.steps):
            if s.kind == "dense":
                ops = "x, W" if self.strategy == "dense" else "x, W(rebuilt)"
            else:
                ops = f"{ids[s.lhs]}, {ids[s.rhs]}"
            ids.append(f"#{k}")
            modes = ",".join(str(m) for m in s.modes) or "-"
            lines.append(
                f"  {k:>2}  {s.kind:<10} {ops:<22} {modes:<8} {','.join(s.summed) or '-':<14} "
                f"{str(tuple(s.out_shape)):<26} {s.macs:>15,} {s.nbytes:>13,}"
            )
        ratio = self.dense_macs / self.macs if self.macs else float("inf")
        lines += (
            [
                "",
                f"  activation MACs: {self.macs:,}   weight-only MACs: {self.weight_macs:,}",
            ]
            + (
                [
                    f"  fewest-MAC factorized order: {self.min_macs:,} activation MACs (this order merges "
                    f"factors: fewer passes over memory)"
                ]
                if self.min_macs != self.macs and self.order
                else []
            )
            + [
                f"  dense MACs: {self.dense_macs:,}   (dense / plan = {ratio:.2f}x)",
                f"  peak intermediate bytes: {self.peak_bytes:,}",
            ]
        )
        return "\n".join(lines)

    def __repr__(self):
        return (
            f"ConvPlan(strategy={self.strategy!r}, input_shape={self.input_shape}, "
            f"output_shape={self.output_shape}, macs={self.macs:,}, dense_macs={self.dense_macs:,})"
        )


def _split_input_shape(input_shape, structure):
    input_shape = tuple(int(s) for s in input_shape)
    n = structure.n_spatial
    if len(input_shape) == n + 2:
        batched = True
        c = input_shape[1]
        spatial = input_shape[2:]
    elif len(input_shape) == n + 1:
        batched = False
        c = input_shape[0]
        spatial = input_shape[1:]
    else:
        raise ValueError(
            f"input of shape {input_shape} does not match a kernel with {n} spatial dims "
            f"(kernel shape {structure.shape}): expected (B, C, *{n} dims) or (C, *{n} dims)"
        )
    if c != structure.in_channels:
        raise ValueError(
            f"channel mismatch: the input has {c} channels (shape {input_shape}) but the kernel expects "
            f"{structure.in_channels} (kernel shape {structure.shape}"
            + (f", groups={structure.groups})" if structure.groups > 1 else ")")
        )
    return batched, spatial


def _new_plan(
    structure,
    input_shape,
    stride,
    padding,
    dilation,
    padding_mode,
    strategy,
    itemsize,
    backend_name,
    cost_model,
    ready_accelerators=(),
    allowed_accelerators=None,
):
    batched, spatial = _split_input_shape(input_shape, structure)
    geometry = make_geometry(
        spatial, structure.shape[2:], stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode
    )
    return ConvPlan(
        structure,
        input_shape,
        geometry,
        batched=batched,
        strategy=strategy,
        itemsize=itemsize,
        backend_name=backend_name,
        cost_model=cost_model,
        ready_accelerators=ready_accelerators,
        allowed_accelerators=allowed_accelerators,
    )


#: conv()'s plans, private to conv() (plan_conv hands out new plans). A group is the accelerator
#: registry (a tuple of the registered objects: a plan cached before ``accelerators.unregister``,
#: or a re-registration under the same name, is not reused) and the kernel's structure.
_conv_plans = PlanCache(_new_plan)


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


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
    return _new_plan(
        *_plan_args(
            kernel_or_shape,
            input_shape,
            stride,
            padding,
            dilation,
            groups,
            padding_mode,
            strategy,
            dtype,
            backend,
            device,
            cost_model,
            accelerators,
        )
    )


def _plan_args(
    kernel_or_shape,
    input_shape,
    stride,
    padding,
    dilation,
    groups,
    padding_mode,
    strategy,
    dtype,
    backend,
    device,
    cost_model,
    accelerators=None,
):
    """The normalised arguments of a plan (hashable: conv() caches plans by them)."""
    structure = structure_of(kernel_or_shape, groups)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    arrays = _kernel_arrays(kernel_or_shape) if backend is None or dtype is None else []
    if arrays:
        owner = get_backend(*arrays)
        if backend is None:
            backend, device = owner, owner.device(arrays[0]) if device is None else device
        if dtype is None:
            dtype = owner.itemsize(arrays[0])
    backend_name = getattr(backend, "name", backend) or "numpy"
    if cost_model is not None and not isinstance(cost_model, CostModel):
        raise TypeError(f"cost_model={cost_model!r} is not a CostModel (or None for the backend's default)")
    # the device only selects a cost model
    model = cost_model or cost_model_for(backend_name, device)
    input_shape = _check_shape(input_shape)
    itemsize = _itemsize(dtype)
    if accelerators is not None:
        if isinstance(accelerators, str):
            raise TypeError(f"accelerators={accelerators!r} must be a sequence of names, e.g. ({accelerators!r},)")
        known = [a.name for a in registered_accelerators()]
        unknown = [a for a in accelerators if a not in known]
        if unknown:
            raise ValueError(f"accelerators={tuple(accelerators)!r}: {unknown} not registered; registered: {known}")
    ready = ()
    if strategy == "auto" and structure.kind != "dense" and len(input_shape) == 2 + structure.n_spatial:
        # accelerators ready here (built before, never now): auto weighs them in. Part of the
        # plan's key: building one later changes what conv() plans next
        ready = tuple(
            a.name
            for a in registered_accelerators()
            if (accelerators is None or a.name in accelerators)
            and "auto" in a.serves
            and a.applies(structure)
            and a.ready(backend_name, device, itemsize)
        )
    return (
        structure,
        input_shape,
        _hashable(stride),
        _hashable(padding),
        _hashable(dilation),
        padding_mode,
        strategy,
        itemsize,
        backend_name,
        model,
        ready,
        None if accelerators is None else tuple(accelerators),
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
    arrays = _kernel_arrays(kernel) or [kernel]
    backend = get_backend(x, *arrays)
    cast = backend.autocast_dtype(x)
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
        with backend.autocast_off(x):
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
    _check_arrays(x, kernel, backend)
    if backend.is_tracing():
        # a plan is chosen per input shape in Python: a trace would freeze it to the traced shape
        raise RuntimeError(
            "tensorconv.conv cannot be recorded by torch.jit.trace (its plan depends on the input "
            "shape, which a trace freezes); trace the layers instead (KruskalConv, TuckerConv and "
            "HOCPBlock record shape-generic standard convs), or use torch.compile"
        )
    structure = structure_of(kernel, groups)
    args = _plan_args(
        structure,
        tuple(int(s) for s in x.shape),
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        strategy,
        backend.itemsize(x),
        backend.name,
        backend.device(x),
        None,
    )
    plan = _conv_plans.get((registered_accelerators(), args[0]), args)
    # the plan was looked up by this kernel's structure and x's shape, and the arrays were
    # checked above: nothing is left for the plan to re-check
    return plan._run(backend, x, kernel)
