"""Choose one option per layer so that the total cost meets a budget at the least total error.

Each layer offers a few options (keep it dense, or factorize it at one of several ranks), each
with a cost (parameters, multiply-adds or seconds) and an error. :func:`allocate` solves this
multiple-choice knapsack by dynamic programming over the budget cut into ``resolution`` equal
units, each option's cost rounded *up* to whole units: the answer always meets the budget, and
it is the exact optimum whenever the costs are whole units (integer costs with ``resolution``
equal to the budget); otherwise it may leave at most one unit per layer unused. A greedy on
marginal error per unit of cost, or a Lagrangian sweep, reaches only the points on each layer's
convex hull and can miss the optimum between them by a whole layer's step; the DP does not, and
it costs ``layers x options x resolution`` additions (milliseconds for a ResNet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["allocate"]


def allocate(options: Sequence[Sequence[tuple[float, float]]], budget: float, *, resolution: int = 4000) -> list[int]:
    """The index of the option chosen for each layer.

    Parameters
    ----------
    options : one sequence per layer of ``(cost, error)`` pairs, costs >= 0, errors finite
    budget : the most that the chosen options may cost together
    resolution : how many units the budget is cut into (costs are rounded up to units)

    Raises
    ------
    ValueError
        If even the cheapest option of every layer exceeds the budget (the message says what
        the least reachable total is), or on malformed input.

    Examples
    --------
    >>> allocate([[(4, 0.0), (1, 0.3)], [(4, 0.0), (2, 0.1)]], budget=6, resolution=6)
    [0, 1]
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r}: expected an int >= 1")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget!r}: expected a finite number > 0")
    layers = [list(layer) for layer in options]
    for i, layer in enumerate(layers):
        if not layer:
            raise ValueError(f"options[{i}] is empty: every layer needs at least one option")
        for cost, error in layer:
            if not (math.isfinite(cost) and cost >= 0 and math.isfinite(error)):
                raise ValueError(f"options[{i}] has (cost, error) = ({cost!r}, {error!r}): expected finite, cost >= 0")
    least = sum(min(c for c, _ in layer) for layer in layers)
    if least > budget:
        raise ValueError(
            f"budget={budget:.6g} cannot be met: the cheapest option of every layer costs {least:.6g} together"
        )
    unit = budget / resolution
    inf = math.inf
    best = np.zeros(resolution + 1)  # best[b]: least error of the layers so far within b units
    picks = []
    for layer in layers:
        new = np.full(resolution + 1, inf)
        pick = np.full(resolution + 1, -1, dtype=np.int64)
        for j, (cost, error) in enumerate(layer):
            units = math.ceil(cost / unit - 1e-9)  # rounding noise must not push a whole unit over
            if units > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[units:] = best[: resolution + 1 - units] + error
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    if not np.isfinite(best[resolution]):
        raise ValueError(
            f"budget={budget:.6g} cannot be met with costs rounded up to units of {unit:.6g}; "
            f"raise resolution= (the cheapest options cost {least:.6g} together)"
        )
    chosen = []
    b = resolution
    for layer, pick in zip(reversed(layers), reversed(picks)):
        j = int(pick[b])
        chosen.append(j)
        b -= math.ceil(layer[j][0] / unit - 1e-9)
    return chosen[::-1]
