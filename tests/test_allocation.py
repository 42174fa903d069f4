"""allocate() against a brute-force optimum over every combination of options."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tensorconv.allocation import allocate


def _brute_force(options, budget):
    best = (math.inf, None)
    for combo in itertools.product(*[range(len(layer)) for layer in options]):
        cost = sum(options[i][j][0] for i, j in enumerate(combo))
        if cost <= budget:
            error = sum(options[i][j][1] for i, j in enumerate(combo))
            best = min(best, (error, combo))
    return best


layers = st.lists(
    st.lists(st.tuples(st.integers(0, 30), st.floats(0, 1, allow_nan=False)), min_size=1, max_size=5),
    min_size=1,
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(options=layers, slack=st.integers(0, 60))
def test_integer_costs_give_the_brute_force_optimum(options, slack):
    budget = sum(min(c for c, _ in layer) for layer in options) + slack
    if budget == 0:
        budget = 1
    want_error, _ = _brute_force(options, budget)
    chosen = allocate(options, budget, resolution=budget)  # one unit per integer: exact
    cost = sum(options[i][j][0] for i, j in enumerate(chosen))
    error = sum(options[i][j][1] for i, j in enumerate(chosen))
    assert cost <= budget
    assert error == pytest.approx(want_error, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    options=st.lists(
        st.lists(st.tuples(st.floats(0.01, 10), st.floats(0, 1, allow_nan=False)), min_size=1, max_size=4),
        min_size=1,
        max_size=4,
    ),
    slack=st.floats(0, 20),
)
def test_real_costs_meet_the_budget_and_lose_at_most_the_rounding(options, slack):
    budget = sum(min(c for c, _ in layer) for layer in options) + slack
    # within less than one unit per layer of the cheapest total, rounding up may leave nothing
    # reachable (allocate says so; tested below)
    assume(slack > len(options) * budget / 1000)
    chosen = allocate(options, budget, resolution=1000)
    cost = sum(options[i][j][0] for i, j in enumerate(chosen))
    error = sum(options[i][j][1] for i, j in enumerate(chosen))
    assert cost <= budget * (1 + 1e-9)
    # rounding each cost up by < one unit: never worse than the optimum of a budget smaller by
    # one unit per layer
    tighter = budget - len(options) * budget / 1000
    reachable = sum(min(c for c, _ in layer) for layer in options)
    if tighter >= reachable:
        assert error <= _brute_force(options, tighter)[0] + 1e-12


def test_a_greedy_on_marginal_error_would_miss_this_optimum():
    # at 10 units a greedy on marginal error per unit saved cuts A to 4 first (0.5 for 6 units)
    # and must then cut B to 5 (error 1.1); the optimum cuts A to 0 and keeps B dense (1.0)
    options = [[(10, 0.0), (4, 0.5), (0, 1.0)], [(10, 0.0), (5, 0.6)]]
    assert allocate(options, 15, resolution=15) == [1, 0]  # 14 units, error 0.5
    assert allocate(options, 9, resolution=9) == [1, 1]  # 9 units, error 1.1
    assert allocate(options, 10, resolution=10) == [2, 0]  # 10 units, error 1.0 (greedy: 1.1)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="cannot be met"):
        allocate([[(5, 0.0)], [(5, 0.0), (4, 1.0)]], 8)
    with pytest.raises(ValueError, match="options\\[1\\] is empty"):
        allocate([[(1, 0.0)], []], 8)
    with pytest.raises(ValueError, match="budget="):
        allocate([[(1, 0.0)]], float("nan"))
    with pytest.raises(ValueError, match="resolution="):
        allocate([[(1, 0.0)]], 3, resolution=0)
    with pytest.raises(ValueError, match="finite"):
        allocate([[(1, np.nan)]], 3)
