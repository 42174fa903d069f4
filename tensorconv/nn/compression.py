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
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..allocation import allocate
from ._pricing import (
    dense_plan,
    option_cost,
    record_input_shapes,
    svd_errors,
    time_interleaved,
    timing_inputs,
)
from ._progress import steps
from .calibration import calibrate, capture, fit_to
from .compress import _carry_state, _eligible
from .layers import KruskalConv, TuckerConv
from .lowrank import LowRankConv, LowRankLinear

__all__ = ["plan_compression", "CompressionPlan", "LayerOption", "BUDGETS", "FACTORIZATIONS"]

BUDGETS = ("latency", "macs", "params")
FACTORIZATIONS = ("cp", "tucker", "svd")
#: the fractions of a layer's dense parameters that its options are sized to (deduplicated ranks)
DEFAULT_FRACTIONS = (1 / 16, 1 / 10, 1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 3 / 4)
_SPATIAL = {"cp": KruskalConv, "tucker": TuckerConv}
#: rounds of :meth:`CompressionPlan.verify` a latency plan gets by default: the first
#: re-allocation corrects most of a miss; a further one absorbs what the layers chosen then add
VERIFY_ROUNDS = 3


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
        #: what the model costs outside the layers considered, per budget kind (unscaled)
        self._fixed = dict(fixed)
        #: seconds are multiplied by these (dense parts, factorized options): 1 until
        #: :meth:`verify` fits them to the measured models
        self.time_scale = {"dense": 1.0, "factorized": 1.0}
        #: the last :meth:`verify`'s measurement: seconds of the dense and the compressed model,
        #: the plan's prediction for the compressed one made before it, and the rounds run
        self.verified = None
        self._allocate()

    def _cost(self, option, what):
        value = option.cost(what)
        if what == "latency":
            value *= self.time_scale["dense" if option.factorization == "dense" else "factorized"]
        return value

    def _fixed_cost(self, what):
        return self._fixed[what] * (self.time_scale["dense"] if what == "latency" else 1.0)

    @property
    def fixed(self) -> float:
        return self._fixed_cost(self.budget)

    @property
    def dense_total(self) -> float:
        """The model as it is, in the budget: the fixed part plus every layer's dense option."""
        return self.fixed + sum(self._cost(layer.options[0], self.budget) for layer in self.layers.values())

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
        return self._fixed_cost(what) + sum(self._cost(self.choice(n), what) for n in self.layers)

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
        least = sum(min(self._cost(layer.options[i], self.budget) for i in layer.allowed) for layer in layers)
        if limit <= 0 or least > limit:
            raise ValueError(
                f"target={self.target} ({self.budget}) cannot be met: the model must come to "
                f"{_fmt(self.dense_total / self.target, self.budget)}, the parts not factorized cost "
                f"{_fmt(self.fixed, self.budget)} and the smallest options of the layers "
                f"{_fmt(least, self.budget)}; lower the target or allow more factorizations / ranks"
            )
        options = [
            [(self._cost(layer.options[i], self.budget), layer.options[i].error ** 2) for i in layer.allowed]
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
        self._replace_layers(target, decompose=True, progress=progress, **decomposition_kwargs)
        if calibration is not None:
            calibrate(target, reference, calibration, rows=rows, seed=seed, progress=progress)
        return target

    def _replace_layers(self, target, *, decompose, progress=None, **decomposition_kwargs):
        """Each chosen layer of ``target`` replaced in place by its option (decomposed from its
        weights, or a skeleton of the same shapes when not ``decompose``)."""
        modules = dict(target.named_modules())
        chosen = [
            (n, layer) for n, layer in self.layers.items() if layer.options[layer.chosen].factorization != "dense"
        ]
        what = "decompose" if decompose else "build"
        for name, layer in steps(chosen, what=what, progress=progress, name=lambda item: item[0]):
            option = layer.options[layer.chosen]
            if name not in modules:
                raise ValueError(
                    f"apply: the model has no module {name!r}; apply the plan to the model it was made for"
                )
            old = modules[name]
            with torch.no_grad():
                new = _build(old, option, decompose=decompose, **decomposition_kwargs)
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else target
            setattr(parent, child, _carry_state(old, new, name) if decompose else new)
        return target

    def verify(self, model: nn.Module, example_inputs: Any, *, rounds: int = VERIFY_ROUNDS, repeat: int = 5, seed=0):
        """Time the compressed model (its layers built at the chosen shapes, not decomposed)
        against ``model`` on ``example_inputs``, interleaved; while the measured speed-up misses
        the target, fit :attr:`time_scale` to the two measurements (the dense parts' seconds to
        the dense model's, then the factorized options' to what the compressed model took beyond
        its dense parts) and allocate again, at most ``rounds`` times. The last measurement is in
        :attr:`verified`; a target still missed after the last round is warned about. Returns
        the plan."""
        if self.budget != "latency":
            raise ValueError(f"verify: the plan's budget is {self.budget!r}; only a latency plan is timed")
        for arg, value in (("rounds", rounds), ("repeat", repeat)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"verify: {arg}={value!r}: expected an int >= 1")
        inputs = timing_inputs(model, example_inputs)
        for done in range(1, rounds + 1):
            compressed = self._replace_layers(copy.deepcopy(model), decompose=False)
            dense_s, compressed_s = time_interleaved([model, compressed], inputs, repeat, seed=seed + done)
            self.verified = {
                "dense": dense_s,
                "compressed": compressed_s,
                "predicted": self.total(),
                "rounds": done,
            }
            if dense_s / compressed_s >= self.target:
                return self
            if done < rounds and not self._rescale(dense_s, compressed_s):
                break
        warnings.warn(
            f"verify: the compressed model measured {dense_s / compressed_s:.2f}x faster than the dense one "
            f"({compressed_s * 1e3:.1f} vs {dense_s * 1e3:.1f} ms), short of target={self.target}x after "
            f"{self.verified['rounds']} round(s); allow smaller ranks (fractions=), more rounds (verify=), "
            "or lower the target",
            stacklevel=2,
        )
        return self

    def _rescale(self, dense_s, compressed_s):
        """Fit :attr:`time_scale` to a measured dense and compressed model and allocate again;
        False (scales and choices left as they were) where the target cannot be met then."""
        layers = list(self.layers.values())
        raw_dense = self._fixed["latency"] + sum(layer.options[0].seconds for layer in layers)
        chosen = [layer.options[layer.chosen] for layer in layers]
        kept = self._fixed["latency"] + sum(o.seconds for o in chosen if o.factorization == "dense")
        factorized = sum(o.seconds for o in chosen if o.factorization != "dense")
        before = dict(self.time_scale), [layer.chosen for layer in layers]
        dense_scale = dense_s / raw_dense
        scale = {"dense": dense_scale, "factorized": self.time_scale["factorized"]}
        if factorized > 0:
            # what the compressed model took beyond its dense parts is its factorized layers'; a
            # floor keeps a measurement that leaves them nothing from pricing them at zero
            scale["factorized"] = max(compressed_s - dense_scale * kept, 0.05 * compressed_s) / factorized
        self.time_scale = scale
        try:
            self._allocate()
        except ValueError:
            self.time_scale = before[0]
            for layer, chosen_index in zip(layers, before[1]):
                layer.chosen = chosen_index
            return False
        return True

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
                    f"{self._cost(o, 'latency') * 1e3:.3f}ms",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        got = self.total()
        lines.append(
            f"{self.budget}: {_fmt(self.dense_total, self.budget)} -> {_fmt(got, self.budget)} "
            f"({self.dense_total / got:.2f}x, target {self.target}x); sum of squared errors {self.error:.4g}"
        )
        if self.verified is not None:
            v = self.verified
            lines.append(
                f"measured ({v['rounds']} round(s)): {v['dense'] * 1e3:.1f}ms -> {v['compressed'] * 1e3:.1f}ms "
                f"({v['dense'] / v['compressed']:.2f}x; predicted {v['predicted'] * 1e3:.1f}ms)"
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


def plan_compression(
    model: nn.Module,
    example_inputs: Any,
    *,
    target: float,
    budget: str = "params",
    factorizations: tuple = FACTORIZATIONS,
    fractions: tuple = DEFAULT_FRACTIONS,
    layers=None,
    measure: bool | None = None,
    verify: int | None = None,
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
        fewest-MAC order); latency the measured time of the whole model (its other ops
        included, as measured once), or with ``measure=False`` the cost model's seconds of every
        conv and linear layer.
    budget : {"params", "macs", "latency"}
    factorizations : subset of ("cp", "tucker", "svd")
        What each layer may become: CP or Tucker for a conv with a spatial kernel (Tucker only
        for a grouped conv), a truncated SVD (two thin layers, :class:`LowRankConv` /
        :class:`LowRankLinear`) for a 1x1 conv or an ``nn.Linear``.
    fractions : the sizes of each layer's options, as fractions of its dense parameters
    layers : callable (name, module) -> bool, optional
        Which layers may be factorized (default: every one that can be).
    measure : bool, optional
        Time every option (and the dense layers and model) on this machine instead of taking the
        cost model's seconds: a layer's options are timed against each other, interleaved,
        ``repeat`` rounds (the medians). Default: True for ``budget="latency"`` (the cost
        model's defaults can be several times off on a given machine; see docs/compress.md),
        False otherwise (no seconds are needed).
    verify : int, optional
        For a latency budget: up to this many rounds of :meth:`CompressionPlan.verify` (the
        compressed model timed against ``model``; when it misses the target, the plan's seconds
        are rescaled to what was measured and the layers allocated again). Default: 3 rounds for
        ``budget="latency"``, none for the others (their counts are exact); 0 turns it off.
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
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat={repeat!r}: expected an int >= 1")
    if measure is None:
        measure = budget == "latency"
    if verify is None:
        verify = VERIFY_ROUNDS if budget == "latency" else 0
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise ValueError(f"verify={verify!r}: expected an int >= 0 (rounds of timing the compressed model)")
    if verify and budget != "latency":
        raise ValueError(f"verify={verify!r} applies to budget='latency' only; budget={budget!r} counts exactly")

    def costs_something(m):
        return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))

    shapes = record_input_shapes(model, example_inputs, costs_something)
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
        plan = dense_plan(m, shape, cost_model)
        dense_params = sum(p.numel() for p in m.parameters(recurse=False))
        options = [LayerOption("dense", None, 0.0, dense_params, plan.macs, plan.seconds)]
        skeletons = [m]
        svd_error = svd_errors(m) if "svd" in kinds else None
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
                params, opt_macs, opt_seconds = option_cost(m, skeleton, shape, cost_model)
                if params >= dense_params:
                    continue
                if calibration is not None:
                    fit = {} if f == "svd" else {"n_iter_max": fit_iterations}
                    with torch.no_grad():
                        fitted = _build(m, replace(option, rank=rank), decompose=True, **fit)
                    error = fit_to(fitted, *layer_io, rows=rows, seed=seed)
                elif f == "svd":
                    error = svd_error[rank]
                else:
                    with torch.no_grad():
                        fitted = _build(m, replace(option, rank=rank), decompose=True, n_iter_max=fit_iterations)
                    error = float(fitted.relative_error)
                options.append(LayerOption(f, rank, error, params, opt_macs, opt_seconds))
                skeletons.append(skeleton)
        if measure:  # the layer as it is and each option, timed against each other
            times = time_interleaved(skeletons, shape, repeat, seed=seed)
            options = [replace(o, seconds=t) for o, t in zip(options, times)]
        planned.append(_Layer(name, shape, options))

    fixed = {"params": sum(p.numel() for p in model.parameters()) - sum(layer.options[0].params for layer in planned)}
    fixed["macs"] = fixed["latency"] = 0.0
    for name, m in other:
        plan = dense_plan(m, shapes[name], cost_model)
        fixed["macs"] += plan.macs
        fixed["latency"] += plan.seconds
    if measure:
        # the whole model's time, less its factorizable layers' (each timed alone): every other op
        (whole,) = time_interleaved([model], timing_inputs(model, example_inputs), repeat, seed=seed)
        fixed["latency"] = max(0.0, whole - sum(layer.options[0].seconds for layer in planned))
    result = CompressionPlan(planned, budget, float(target), fixed)
    if verify:
        result.verify(model, example_inputs, rounds=verify, repeat=repeat, seed=seed)
    return result
