"""Compress a model to a target: per-layer factorizations and ranks chosen for a budget.

:func:`plan_compression` lists, for every layer it can factorize, the options (keep it dense, or
CP / Tucker / truncated SVD at a few ranks), each with its error and its cost in the chosen budget
(parameters, multiply-adds, or seconds from the plans' cost model or timed here), then chooses one
option per layer so that the model meets the target at the least total error
(:func:`tensorconv.allocation.allocate`). The plan is the caller's: it prints as a table, can be
edited (``pin``, ``exclude``) and ``apply`` builds the compressed model.

The error of an option is the relative Frobenius error of the layer's weight (the truncated SVD's
exactly; CP and Tucker from a fit with ``fit_iterations`` iterations, which ``apply`` refines);
the total that is minimised is the sum of their squares (the variance of the noise the layers add,
if each adds noise in proportion to its error).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..allocation import allocate
from ..plans.plan import plan_conv
from ._observe import observe
from ._progress import steps
from .calibration import calibrate, capture, fit_to
from .compress import _carry_state, _eligible, _example_inputs
from .layers import KruskalConv, TuckerConv
from .lowrank import LowRankConv, LowRankLinear

__all__ = ["plan_compression", "CompressionPlan", "LayerOption", "BUDGETS", "FACTORIZATIONS"]

BUDGETS = ("latency", "macs", "params")
FACTORIZATIONS = ("cp", "tucker", "svd")
#: the fractions of a layer's dense parameters that its options are sized to (deduplicated ranks)
DEFAULT_FRACTIONS = (1 / 16, 1 / 10, 1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 3 / 4)
_SPATIAL = {"cp": KruskalConv, "tucker": TuckerConv}


@dataclass(frozen=True)
class LayerOption:
    """One way to run a layer: ``factorization`` is ``"dense"``, ``"cp"``, ``"tucker"`` or ``"svd"``."""

    factorization: str
    rank: Any
    error: float  # relative Frobenius error of the weight
    params: int
    macs: int
    seconds: float  # the cost model's, or timed with measure=True

    def cost(self, budget: str) -> float:
        return {"params": self.params, "macs": self.macs, "latency": self.seconds}[budget]


@dataclass
class _Layer:
    name: str
    input_shape: tuple
    options: list  # of LayerOption, dense first
    allowed: list = field(default_factory=list)  # indices into options the allocation may pick
    chosen: int = 0


class CompressionPlan:
    """What :func:`plan_compression` chose for every layer, and the totals against the target.

    Attributes
    ----------
    budget : str
    target : float
        How many times smaller (params, macs) or faster (latency) the model is asked to be.
    layers : dict
        Layer name -> its options (``options``), the chosen one (``choice``) and the input shape.
    fixed : float
        What the model costs outside the layers considered (other parameters; convs and linear
        layers that cannot be factorized; with ``measure=True`` the time of every other op).
    """

    def __init__(self, layers, budget, target, fixed):
        self.budget, self.target = budget, target
        self.layers = {layer.name: layer for layer in layers}
        #: what the model costs outside the layers considered, per budget kind
        self._fixed = dict(fixed)
        self.dense_total = self.fixed + sum(layer.options[0].cost(budget) for layer in layers)
        self._allocate()

    @property
    def fixed(self) -> float:
        return self._fixed[self.budget]

    # -- what was chosen ---------------------------------------------------------------------
    def choice(self, name) -> LayerOption:
        layer = self._layer(name)
        return layer.options[layer.chosen]

    @property
    def choices(self) -> dict:
        """Layer name -> (factorization, rank); ``("dense", None)`` for a layer kept dense."""
        return {name: (self.choice(name).factorization, self.choice(name).rank) for name in self.layers}

    def total(self, what=None) -> float:
        """The compressed model's ``what`` (default: the budget): the fixed part plus every choice."""
        what = what or self.budget
        return self._fixed[what] + sum(self.choice(n).cost(what) for n in self.layers)

    @property
    def error(self) -> float:
        """The sum of the chosen options' squared relative errors (what the allocation minimises)."""
        return sum(self.choice(n).error ** 2 for n in self.layers)

    # -- edits -------------------------------------------------------------------------------
    def pin(self, name, factorization, rank=None) -> CompressionPlan:
        """Keep ``name`` at ``factorization`` (at ``rank`` if given; else the allocation picks among
        that factorization's ranks) and allocate the rest again. Returns the plan."""
        layer = self._layer(name)
        allowed = [
            i
            for i, o in enumerate(layer.options)
            if o.factorization == factorization and (rank is None or o.rank == rank)
        ]
        if not allowed:
            offered = sorted({(o.factorization, str(o.rank)) for o in layer.options})
            raise ValueError(
                f"pin({name!r}, {factorization!r}, rank={rank!r}): not an option of this layer; options: {offered}"
            )
        layer.allowed = allowed
        self._allocate()
        return self

    def exclude(self, name) -> CompressionPlan:
        """Keep ``name`` dense and allocate the rest again. Returns the plan."""
        self._layer(name).allowed = [0]
        self._allocate()
        return self

    def _layer(self, name):
        if name not in self.layers:
            raise ValueError(f"no layer named {name!r} in the plan; layers: {list(self.layers)}")
        return self.layers[name]

    def _allocate(self):
        limit = self.dense_total / self.target - self.fixed
        layers = list(self.layers.values())
        for layer in layers:
            if not layer.allowed:
                layer.allowed = list(range(len(layer.options)))
        least = sum(min(layer.options[i].cost(self.budget) for i in layer.allowed) for layer in layers)
        if limit <= 0 or least > limit:
            raise ValueError(
                f"target={self.target} ({self.budget}) cannot be met: the model must come to "
                f"{_fmt(self.dense_total / self.target, self.budget)}, the parts not factorized cost "
                f"{_fmt(self.fixed, self.budget)} and the smallest options of the layers "
                f"{_fmt(least, self.budget)}; lower the target or allow more factorizations / ranks"
            )
        options = [
            [(layer.options[i].cost(self.budget), layer.options[i].error ** 2) for i in layer.allowed]
            for layer in layers
        ]
        picks = allocate(options, limit)
        for layer, j in zip(layers, picks):
            layer.chosen = layer.allowed[j]

    # -- the model -----------------------------------------------------------------------------
    def apply(
        self,
        model: nn.Module,
        *,
        inplace=False,
        calibration=None,
        rows=8192,
        seed=0,
        progress=None,
        **decomposition_kwargs,
    ) -> nn.Module:
        """The compressed model: each layer replaced by its chosen option, decomposed from the
        layer's weights (CP / Tucker with ``decomposition_kwargs``, e.g. ``n_iter_max=``); state
        (trainable or frozen, training flag, hooks) kept as :func:`factorize` does. With
        ``calibration`` batches, each new layer's output factor is then refitted to ``model``'s
        outputs in network order (:func:`tensorconv.nn.calibration.calibrate`). ``model`` is left
        untouched unless ``inplace`` (then it is also the reference for the calibration, taken
        before any layer is replaced). ``progress``: as :func:`plan_compression`'s."""
        reference = copy.deepcopy(model) if (inplace and calibration is not None) else model
        target = model if inplace else copy.deepcopy(model)
        modules = dict(target.named_modules())
        chosen = [
            (n, layer) for n, layer in self.layers.items() if layer.options[layer.chosen].factorization != "dense"
        ]
        for name, layer in steps(chosen, what="decompose", progress=progress, name=lambda item: item[0]):
            option = layer.options[layer.chosen]
            if name not in modules:
                raise ValueError(
                    f"apply: the model has no module {name!r}; apply the plan to the model it was made for"
                )
            old = modules[name]
            with torch.no_grad():
                new = _build(old, option, decompose=True, **decomposition_kwargs)
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else target
            setattr(parent, child, _carry_state(old, new, name))
        if calibration is not None:
            calibrate(target, reference, calibration, rows=rows, seed=seed, progress=progress)
        return target

    # -- reporting ----------------------------------------------------------------------------
    def __str__(self):
        rows = [("layer", "choice", "rank", "error", "params", "MACs", "seconds")]
        for name, layer in self.layers.items():
            o = layer.options[layer.chosen]
            rank = "-" if o.rank is None else (str(o.rank) if isinstance(o.rank, int) else "x".join(map(str, o.rank)))
            rows.append(
                (
                    name,
                    o.factorization,
                    rank,
                    f"{o.error:.3g}",
                    _fmt(o.params),
                    _fmt(o.macs),
                    f"{o.seconds * 1e3:.3f}ms",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        got = self.total()
        lines.append(
            f"{self.budget}: {_fmt(self.dense_total, self.budget)} -> {_fmt(got, self.budget)} "
            f"({self.dense_total / got:.2f}x, target {self.target}x); sum of squared errors {self.error:.4g}"
        )
        return "\n".join(lines)

    def __repr__(self):
        kept = sum(1 for n in self.layers if self.choice(n).factorization == "dense")
        return (
            f"<CompressionPlan {self.budget} target={self.target}x: {len(self.layers)} layers, {kept} kept dense, "
            f"{self.dense_total / self.total():.2f}x>"
        )


def _fmt(value, budget="params"):
    if budget == "latency":
        return f"{value * 1e3:.3f}ms"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def _kind(module):
    """Which factorizations apply to ``module``: ("cp", "tucker") for a spatial conv (Tucker only
    when grouped), ("svd",) for a 1x1 conv with groups=1 or an ``nn.Linear`` (the exact type:
    subclasses such as attention's output projection are read through their owner's weight, not
    called), () otherwise (and for conv subclasses with their own forward)."""
    from .._conv_modules import check_plain_conv

    if type(module) is nn.Linear:
        return ("svd",)
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ()
    try:
        check_plain_conv(module, "plan_compression")
    except TypeError:
        return ()
    if _eligible(module):
        return ("cp", "tucker") if module.groups == 1 else ("tucker",)
    return ("svd",) if module.groups == 1 else ()


def _build(module, option, *, decompose, **decomposition_kwargs):
    f, rank = option.factorization, option.rank
    if f == "svd":
        if isinstance(module, nn.Linear):
            return LowRankLinear.from_linear(module, rank) if decompose else LowRankLinear.skeleton(module, rank)
        return LowRankConv.from_conv(module, rank) if decompose else LowRankConv.skeleton(module, rank)
    cls = _SPATIAL[f]
    return cls.from_conv(module, rank, **decomposition_kwargs) if decompose else cls.skeleton(module, rank)


def _record_inputs(model, example_inputs, wanted):
    """Each wanted module's input shape, from one forward pass (eval mode, no gradients)."""
    shapes = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input is unchanged

        return hook

    observe(
        model,
        [(m, "pre", record(name)) for name, m in model.named_modules() if wanted(m)],
        [_example_inputs(model, example_inputs)],
    )
    return shapes


def _plan_of(weight_or_kernel, shape, p, cost_model, **geometry):
    """The plan ``conv()`` makes for this weight (a shape) or kernel, in ``p``'s dtype and device."""
    return plan_conv(
        weight_or_kernel, shape, **geometry, dtype=p.dtype, backend="torch", device=p.device, cost_model=cost_model
    )


def _dense_plan(module, shape, cost_model=None):
    """The plan of a conv or linear layer as it is (a linear layer: a 1x1 conv over its rows)."""
    p = module.weight
    if isinstance(module, nn.Linear):
        rows = (math.prod(shape[:-1]), module.in_features, 1)
        return _plan_of((module.out_features, module.in_features, 1), rows, p, cost_model)
    geometry = dict(
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        padding_mode=module.padding_mode,
    )
    return _plan_of(tuple(p.shape), shape, p, cost_model, **geometry)


def _option_cost(module, layer, shape, cost_model=None):
    """(params, MACs, cost-model seconds) of a built (skeleton) option."""
    params = sum(p.numel() for p in layer.parameters())
    if isinstance(layer, (KruskalConv, TuckerConv)):
        plan = _plan_of(layer.kernel, shape, module.weight, cost_model, **layer._conv_arguments())
        # MACs of the factorized form (the fewest-MAC order): a count that holds on every machine,
        # where ``auto`` may still run a small layer's rebuilt dense kernel if that is faster there
        return params, plan.min_macs, plan.seconds
    first = _dense_plan(layer.first, shape, cost_model)
    if isinstance(layer, LowRankLinear):
        inner = shape[:-1] + (layer.first.out_features,)
    else:
        inner = first.output_shape
    second = _dense_plan(layer.second, inner, cost_model)
    return params, first.macs + second.macs, first.seconds + second.seconds


def _timed(module, inputs, repeat):
    """Median seconds of ``module(*inputs)`` (no gradients, eval mode, after a warm-up); a shape
    for ``inputs`` is a random input of that shape."""
    p = next(module.parameters())
    if not isinstance(inputs, tuple) or not isinstance(inputs[0], torch.Tensor):
        inputs = (torch.randn(inputs, dtype=p.dtype, device=p.device),)
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)
    times = []
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(*inputs)
            for _ in range(repeat):
                sync()
                t0 = time.perf_counter()
                module(*inputs)
                sync()
                times.append(time.perf_counter() - t0)
    finally:
        module.train(was_training)
    return sorted(times)[len(times) // 2]


def _svd_errors(module):
    """The truncated SVD's relative error at every rank (index r), from one SVD."""
    w = module.weight.detach().reshape(module.weight.shape[0], -1).to(torch.float64)
    # squared singular values as the eigenvalues of the smaller Gram matrix: a tenth of an SVD's
    # time, and the tail energies the errors need stay exact to rounding of the total energy
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    s = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    tail = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0]).tolist() + [0.0]
    total = float(s.sum())
    return [math.sqrt(t / total) if total > 0 else 0.0 for t in tail]


def plan_compression(
    model: nn.Module,
    example_inputs: Any,
    *,
    target: float,
    budget: str = "params",
    factorizations: tuple = FACTORIZATIONS,
    fractions: tuple = DEFAULT_FRACTIONS,
    layers=None,
    measure: bool = False,
    cost_model=None,
    repeat: int = 5,
    fit_iterations: int = 10,
    calibration=None,
    rows: int = 8192,
    seed: int = 0,
    progress: bool | None = None,
) -> CompressionPlan:
    """Plan how to factorize ``model`` to be ``target`` times smaller or faster at the least error.

    Parameters
    ----------
    model : nn.Module
        Left untouched (``plan.apply(model)`` returns the compressed copy).
    example_inputs : a shape (batch included), a tuple of shapes, or example tensors
        What the model is run on once to see each layer's input shape (latency and MACs depend
        on it).
    target : float > 1
        How many times fewer parameters (``budget="params"``) or multiply-adds (``"macs"``), or
        how many times less time (``"latency"``), the compressed model should need. Parameters
        count the whole model; MACs those of every conv and linear layer (a factorized one in its
        fewest-MAC order); latency the cost
        model's seconds of every conv and linear layer, or with ``measure=True`` the measured
        time of the whole model (the other ops included, as measured once).
    budget : {"params", "macs", "latency"}
    factorizations : subset of ("cp", "tucker", "svd")
        What each layer may become: CP or Tucker for a conv with a spatial kernel (Tucker only
        for a grouped conv), a truncated SVD (two thin layers, :class:`LowRankConv` /
        :class:`LowRankLinear`) for a 1x1 conv or an ``nn.Linear``.
    fractions : the sizes of each layer's options, as fractions of its dense parameters
    layers : callable (name, module) -> bool, optional
        Which layers may be factorized (default: every one that can be).
    measure : bool
        Time every option (and the dense layers and model) on this machine instead of taking the
        cost model's seconds (``repeat`` runs each, the median).
    cost_model : :class:`tensorconv.plans.CostModel`, optional
        The model that prices the options' seconds (e.g. :func:`tensorconv.plans.calibrate`'s
        for this machine); default: torch's default model for the device.
    fit_iterations : int
        ALS / HOOI iterations of the CP and Tucker fits that give each option's error.
    calibration : iterable of input batches, optional
        With a few batches, an option's error is the relative error of the layer's *output* on
        the inputs the dense model gives it there, after its output factor is refitted to the
        dense layer's outputs by least squares (:mod:`tensorconv.nn.calibration`; ``rows``
        sampled positions per layer, ``seed``); pass the same batches to ``apply``.
    progress : bool, optional
        Show each layer as its options are fitted, with an estimate of the time left (tqdm where
        it is installed); default: only where stderr is a terminal.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorconv.nn import plan_compression
    >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
    ...                     nn.Flatten(), nn.Linear(64 * 8 * 8, 10))
    >>> plan = plan_compression(net, (1, 3, 8, 8), target=4.0, budget="params")
    >>> small = plan.apply(net)
    >>> n = lambda m: sum(p.numel() for p in m.parameters())
    >>> n(net) / n(small) >= 4.0
    True
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget={budget!r} is not one of {BUDGETS}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 1 < target < math.inf:
        raise ValueError(f"target={target!r}: expected a number > 1 (how many times smaller or faster)")
    unknown = set(factorizations) - set(FACTORIZATIONS)
    if unknown or not factorizations:
        raise ValueError(f"factorizations={factorizations!r}: expected a non-empty subset of {FACTORIZATIONS}")
    if not fractions or any(not isinstance(f, float) or not 0 < f < 1 for f in fractions):
        raise ValueError(f"fractions={fractions!r}: expected floats in (0, 1)")
    if layers is not None and not callable(layers):
        raise TypeError(f"layers must be a callable (name, module) -> bool, got {type(layers).__name__}")
    if calibration is not None:
        calibration = list(calibration)
        if not calibration:
            raise ValueError("calibration is empty: pass a few input batches, or None to plan on weight errors")
    if isinstance(fit_iterations, bool) or not isinstance(fit_iterations, int) or fit_iterations < 1:
        raise ValueError(f"fit_iterations={fit_iterations!r}: expected an int >= 1")

    def costs_something(m):
        return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))

    shapes = _record_inputs(model, example_inputs, costs_something)
    names_seen = set()
    considered, other = [], []
    for name, m in model.named_modules():
        if not costs_something(m) or name not in shapes or id(m) in names_seen:
            continue
        names_seen.add(id(m))
        kinds = [f for f in _kind(m) if f in factorizations]
        if kinds and (layers is None or layers(name, m)):
            considered.append((name, m, kinds))
        else:
            other.append((name, m))

    planned = []
    for name, m, kinds in steps(considered, what="plan_compression", progress=progress, name=lambda c: c[0]):
        shape = shapes[name]
        dense_plan = _dense_plan(m, shape, cost_model)
        macs, seconds = dense_plan.macs, dense_plan.seconds
        if measure:
            seconds = _timed(m, shape, repeat)
        dense_params = sum(p.numel() for p in m.parameters(recurse=False))
        options = [LayerOption("dense", None, 0.0, dense_params, macs, seconds)]
        svd_errors = _svd_errors(m) if "svd" in kinds else None
        if calibration is not None:  # the layer's inputs and outputs in the dense model, one layer at a time
            pairs = capture(model, [name], calibration, "both")[name]
            layer_io = ([x for x, _ in pairs], [y for _, y in pairs])
        seen = set()
        for f in kinds:
            for fraction in fractions:
                option = LayerOption(f, fraction, 0.0, 0, 0, 0.0)
                try:
                    skeleton = _build(m, option, decompose=False)
                except ValueError:
                    continue
                rank = skeleton.rank if f != "tucker" else tuple(skeleton.rank)
                if (f, rank) in seen:
                    continue
                seen.add((f, rank))
                params, opt_macs, opt_seconds = _option_cost(m, skeleton, shape, cost_model)
                if params >= dense_params:
                    continue
                if calibration is not None:
                    fit = {} if f == "svd" else {"n_iter_max": fit_iterations}
                    with torch.no_grad():
                        fitted = _build(m, replace(option, rank=rank), decompose=True, **fit)
                    error = fit_to(fitted, *layer_io, rows=rows, seed=seed)
                elif f == "svd":
                    error = svd_errors[rank]
                else:
                    with torch.no_grad():
                        fitted = _build(m, replace(option, rank=rank), decompose=True, n_iter_max=fit_iterations)
                    error = float(fitted.relative_error)
                if measure:
                    opt_seconds = _timed(skeleton, shape, repeat)
                options.append(LayerOption(f, rank, error, params, opt_macs, opt_seconds))
        planned.append(_Layer(name, shape, options))

    fixed = {"params": sum(p.numel() for p in model.parameters()) - sum(layer.options[0].params for layer in planned)}
    fixed["macs"] = fixed["latency"] = 0.0
    for name, m in other:
        dense_plan = _dense_plan(m, shapes[name], cost_model)
        macs, seconds = dense_plan.macs, dense_plan.seconds
        fixed["macs"] += macs
        fixed["latency"] += seconds
    if measure:
        # the whole model's time, less its factorizable layers' (each timed alone): every other op
        whole = _timed(model, _example_inputs(model, example_inputs), repeat)
        fixed["latency"] = max(0.0, whole - sum(layer.options[0].seconds for layer in planned))
    return CompressionPlan(planned, budget, float(target), fixed)
