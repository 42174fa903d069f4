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

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import _pricing
from ._pricing import dense_plan, option_cost, record_input_shapes, svd_errors, timing_inputs
from ._progress import steps
from .calibration import capture, fit_to
from .compress import _eligible, _svd_eligible
from .compression_plan import VERIFY_MARGIN, VERIFY_ROUNDS, CompressionPlan, LayerOption, _build, _Layer

__all__ = ["plan_compression", "CompressionPlan", "LayerOption", "BUDGETS", "FACTORIZATIONS"]

BUDGETS = ("latency", "macs", "params")
FACTORIZATIONS = ("cp", "tucker", "svd")
#: the fractions of a layer's dense parameters that its options are sized to (deduplicated ranks)
DEFAULT_FRACTIONS = (1 / 16, 1 / 10, 1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 3 / 4)


def _kind(module):
    """Which factorizations apply to ``module``: ("cp", "tucker") for a spatial conv (Tucker only
    when grouped), ("svd",) for what ``factorize(..., factorization="svd")`` replaces with
    groups=1 (a 1x1 conv, or an ``nn.Linear`` of exactly that type), () otherwise (and for conv
    subclasses with their own forward)."""
    from .._conv_modules import check_plain_conv

    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        try:
            check_plain_conv(module, "plan_compression")
        except TypeError:
            return ()
    if _eligible(module):
        return ("cp", "tucker") if module.groups == 1 else ("tucker",)
    return ("svd",) if _svd_eligible(module) and getattr(module, "groups", 1) == 1 else ()


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
            times = _pricing.time_interleaved(skeletons, shape, repeat, seed=seed)
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
        (whole,) = _pricing.time_interleaved([model], timing_inputs(model, example_inputs), repeat, seed=seed)
        fixed["latency"] = max(0.0, whole - sum(layer.options[0].seconds for layer in planned))
    result = CompressionPlan(planned, budget, float(target), fixed, allocate=False)
    if verify:  # aim where a verification counts the target as met
        result._margin = VERIFY_MARGIN
    try:
        result._allocate()
    except ValueError as exc:
        if not verify:
            raise
        # a layer timed alone can cost more than inside the model (its input's layout, caches):
        # the model itself decides whether the target is out of reach
        result._allocate_by_measuring(model, example_inputs, repeat, seed, str(exc))
    if verify:
        result.verify(model, example_inputs, rounds=verify, repeat=repeat, seed=seed)
    return result
