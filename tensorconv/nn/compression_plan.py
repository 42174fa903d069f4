"""The compression plan the caller holds: per layer its options and the chosen one, the totals
against the target, edits (``pin``, ``exclude``), verification by timing (``verify``) and
``apply``. :func:`tensorconv.nn.plan_compression` makes one."""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..allocation import allocate
from . import _pricing
from ._pricing import timing_inputs
from ._progress import steps
from .calibration import calibrate
from .compress import _carry_state, _low_rank
from .layers import KruskalConv, TuckerConv

__all__ = ["CompressionPlan", "LayerOption", "VERIFY_ROUNDS", "VERIFY_MARGIN"]

_SPATIAL = {"cp": KruskalConv, "tucker": TuckerConv}
#: rounds of :meth:`CompressionPlan.verify` a latency plan gets by default: the first
#: re-allocation corrects most of a miss; a further one absorbs what the layers chosen then add
VERIFY_ROUNDS = 3
#: how far beyond the target a verified measurement must land to count as meeting it: the
#: interleaved medians of two timings in one process differ by a few percent on the project's
#: VMs, and a plan measured just at its target would miss it about half the time when timed again
VERIFY_MARGIN = 1.03
#: a measurement at most this far beyond the target (and its margin) ends the verification; one
#: further beyond it spends another round on an allocation with less error
CLOSE_ENOUGH = 1.10


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
    time_scale : dict
        Latency plans: the factors on the dense parts' and the factorized options' seconds,
        fitted by :meth:`verify` to the measured models (1 before).
    verified : dict or None
        The measurement of the allocation :meth:`verify` kept: ``dense`` and ``compressed``
        seconds (the slower of its two timings), ``predicted`` (the plan's seconds for it before
        it was measured), ``rounds`` (allocations measured) and ``timings`` (measurements taken).
    """

    def __init__(self, layers, budget, target, fixed, *, allocate=True):
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
        #: measured allocations that met the target: (error, chosen option per layer, measurement)
        self._met = []
        #: the allocation aims this much beyond the target: VERIFY_MARGIN where the plan is
        #: verified, more once a measurement fell short
        self._margin = 1.0
        if allocate:
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
        self._met = []  # measured allocations may not respect the edit
        self._allocate()
        return self

    def exclude(self, name) -> CompressionPlan:
        """Keep ``name`` dense and allocate the rest again. Returns the plan."""
        self._layer(name).allowed = [0]
        self._met = []
        self._allocate()
        return self

    def _layer(self, name):
        if name not in self.layers:
            raise ValueError(f"no layer named {name!r} in the plan; layers: {list(self.layers)}")
        return self.layers[name]

    def _allocate(self):
        goal = self.dense_total / (self.target * self._margin)
        limit = goal - self.fixed
        layers = list(self.layers.values())
        for layer in layers:
            if not layer.allowed:
                layer.allowed = list(range(len(layer.options)))
        least = sum(min(self._cost(layer.options[i], self.budget) for i in layer.allowed) for layer in layers)
        if limit <= 0 or least > limit:
            raise ValueError(
                f"target={self.target} ({self.budget}) cannot be met: the model must come to "
                f"{_fmt(goal, self.budget)}"
                + (f" (aiming {self._margin - 1:.0%} beyond the target)" if self._margin != 1.0 else "")
                + f", the parts not factorized cost "
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
        its dense parts) and allocate again, at most ``rounds`` times; a measurement more than 10 %
        beyond the target spends a further round the same way on an allocation with less
        error. The allocation kept is the least-error one measured to meet the target in two
        timings (the second taken after the rounds, since one timing window can be a fast minute
        of a shared VM; one that misses there is dropped, and where none is left an allocation
        tightened by that shortfall is timed twice), its slower measurement in :attr:`verified`
        (with the prediction made before it) and :attr:`time_scale` fitted to it, so that
        :meth:`total` is what was measured; with none, the last is kept and a
        warning says so. Returns the plan."""
        if self.budget != "latency":
            raise ValueError(f"verify: the plan's budget is {self.budget!r}; only a latency plan is timed")
        for arg, value in (("rounds", rounds), ("repeat", repeat)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"verify: {arg}={value!r}: expected an int >= 1")
        inputs = timing_inputs(model, example_inputs)
        seeds = itertools.count(seed + 1)
        for done in range(1, rounds + 1):
            dense_s, compressed_s = self._measure(model, inputs, repeat, next(seeds))
            met = self._record(dense_s, compressed_s, done)
            if done == rounds or (met and dense_s / compressed_s <= self.target * VERIFY_MARGIN * CLOSE_ENOUGH):
                break
            if met:  # well beyond the target: the seconds fitted to it may allow less error
                self._margin = 1.0
            # the seconds refitted to what was measured; where that allocation is out of reach,
            # the same seconds asked for the shortfall beyond the target
            if not (self._rescale(dense_s, compressed_s) or (not met and self._tighten(dense_s / compressed_s))):
                break
        confirmed = self._confirm(model, inputs, repeat, seeds, tries=rounds)
        if confirmed is not None:
            self.verified = confirmed
            self.time_scale = self._fitted_scales(confirmed["dense"], confirmed["compressed"])
            return self
        dense_s, compressed_s = self.verified["dense"], self.verified["compressed"]
        warnings.warn(
            f"verify: the compressed model measured {dense_s / compressed_s:.2f}x faster than the dense one "
            f"({compressed_s * 1e3:.1f} vs {dense_s * 1e3:.1f} ms), short of target={self.target}x (and the "
            f"{VERIFY_MARGIN - 1:.0%} beyond it a second timing needs) after "
            f"{self.verified['timings']} timing(s); allow smaller ranks (fractions=), more rounds (verify=), "
            "or lower the target",
            stacklevel=2,
        )
        return self

    def _confirm(self, model, inputs, repeat, seeds, tries):
        """The least-error allocation of those measured to meet the target, timed once more: one
        timing window can be a fast minute of a shared VM. Kept (its choices set) where the second
        timing meets the target too, with the slower of its two measurements; else dropped and the
        next one tried, and once none is left, an allocation tightened by the shortfall the second
        timing showed is measured (``tries`` timings in all). Returns the measurement kept, or None."""
        while self._met and tries > 0:
            entry = min(self._met, key=lambda m: m[0])
            self._met.remove(entry)
            _, chosen, first = entry
            for layer, index in zip(self.layers.values(), chosen):
                layer.chosen = index
            dense_s, compressed_s = self._measure(model, inputs, repeat, next(seeds))
            tries -= 1
            speedup = dense_s / compressed_s
            if speedup >= self.target * VERIFY_MARGIN:
                slower = min(first, {**first, "dense": dense_s, "compressed": compressed_s}, key=_speedup)
                return dict(slower, rounds=self.verified["rounds"], timings=self.verified["timings"] + 1)
            self.verified = dict(first, dense=dense_s, compressed=compressed_s, timings=self.verified["timings"] + 1)
            if not self._met and tries > 0 and self._tighten(speedup):
                # its first timing; the loop times it again before it is kept
                self._record(*self._measure(model, inputs, repeat, next(seeds)), self.verified["rounds"] + 1)
                tries -= 1
        return None

    def _record(self, dense_s, compressed_s, rounds):
        """Keep a measurement of the current allocation (with the prediction made before it);
        whether it met the target."""
        timings = self.verified["timings"] + 1 if self.verified else 1
        self.verified = {
            "dense": dense_s,
            "compressed": compressed_s,
            "predicted": self.total(),
            "rounds": rounds,
            "timings": timings,
        }
        met = dense_s / compressed_s >= self.target * VERIFY_MARGIN
        if met:
            self._met.append((self.error, [layer.chosen for layer in self.layers.values()], dict(self.verified)))
        return met

    def _tighten(self, measured):
        """Allocate again for ``target / measured`` times more than the target asks (the current
        seconds); False (margin and choices as they were) where that cannot be met."""
        return self._reallocate(self.time_scale, self._margin * self.target * VERIFY_MARGIN / measured)

    def _reallocate(self, time_scale, margin):
        """Allocate again with these seconds' scales and this margin; False (scales, margin and
        choices left as they were) where the target cannot be met then."""
        layers = list(self.layers.values())
        before = self.time_scale, self._margin, [layer.chosen for layer in layers]
        self.time_scale, self._margin = time_scale, margin
        try:
            self._allocate()
        except ValueError:
            self.time_scale, self._margin = before[0], before[1]
            for layer, index in zip(layers, before[2]):
                layer.chosen = index
            return False
        return True

    def _measure(self, model, inputs, repeat, seed):
        """Seconds of ``model`` and of the plan's compressed model (layers built, not decomposed),
        timed interleaved."""
        compressed = self._replace_layers(copy.deepcopy(model), decompose=False)
        return _pricing.time_interleaved([model, compressed], inputs, repeat, seed=seed)

    def _allocate_by_measuring(self, model, example_inputs, repeat, seed, reason):
        """Where the layers' options, each timed alone, cannot meet the target: time the model
        with every layer at its cheapest option, rescale to that and allocate; a ValueError
        (``reason`` and the measurement) where even that model is too slow."""
        for layer in self.layers.values():
            layer.allowed = layer.allowed or list(range(len(layer.options)))
            layer.chosen = min(layer.allowed, key=lambda i, layer=layer: self._cost(layer.options[i], "latency"))
        dense_s, compressed_s = self._measure(model, timing_inputs(model, example_inputs), repeat, seed)
        if self._record(dense_s, compressed_s, 0):
            self._rescale(dense_s, compressed_s)  # where the rescaled target is out of reach, the cheapest stay
        else:
            raise ValueError(
                f"{reason}; measured with every layer at its cheapest option, the model runs "
                f"{dense_s / compressed_s:.2f}x faster than dense ({compressed_s * 1e3:.2f} vs {dense_s * 1e3:.2f} ms)"
            ) from None

    def _fitted_scales(self, dense_s, compressed_s):
        """:attr:`time_scale` fitted to a measured dense model and the current allocation's
        measured compressed model: the dense parts' seconds to the dense model's, the factorized
        options' to what the compressed model took beyond its dense parts."""
        layers = list(self.layers.values())
        raw_dense = self._fixed["latency"] + sum(layer.options[0].seconds for layer in layers)
        chosen = [layer.options[layer.chosen] for layer in layers]
        kept = self._fixed["latency"] + sum(o.seconds for o in chosen if o.factorization == "dense")
        factorized = sum(o.seconds for o in chosen if o.factorization != "dense")
        dense_scale = dense_s / raw_dense
        scale = {"dense": dense_scale, "factorized": self.time_scale["factorized"]}
        if factorized > 0:
            # a floor keeps a measurement that leaves the factorized layers nothing from pricing
            # them at zero
            scale["factorized"] = max(compressed_s - dense_scale * kept, 0.05 * compressed_s) / factorized
        return scale

    def _rescale(self, dense_s, compressed_s):
        """Scales fitted to the measurement (:meth:`_fitted_scales`) and allocate again, aiming at
        least :data:`VERIFY_MARGIN` beyond the target; False (as :meth:`_reallocate`) where the
        target cannot be met then."""
        return self._reallocate(self._fitted_scales(dense_s, compressed_s), max(self._margin, VERIFY_MARGIN))

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


def _speedup(measurement):
    return measurement["dense"] / measurement["compressed"]


def _fmt(value, budget="params"):
    if budget == "latency":
        return f"{value * 1e3:.3f}ms"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def _build(module, option, *, decompose, **decomposition_kwargs):
    """``module`` as ``option``: decomposed from its weights, or a skeleton of the same shapes."""
    f, rank = option.factorization, option.rank
    if f == "svd":
        return _low_rank(module, rank, decompose=decompose)
    cls = _SPATIAL[f]
    return cls.from_conv(module, rank, **decomposition_kwargs) if decompose else cls.skeleton(module, rank)
