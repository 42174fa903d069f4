import numpy as np
import pytest
import tensorly as tl
from conftest import rel_err, to_backend
from hypothesis import given
from hypothesis import strategies as st

from tensorconv import fold, mode_dot, multi_mode_dot, unfold


@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=5), data=st.data())
def test_mode_dot_matches_einsum(backend, shape, data):
    mode = data.draw(st.integers(0, len(shape) - 1))
    j = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(0)
    x, m = rng.standard_normal(shape), rng.standard_normal((j, shape[mode]))
    letters = "abcdef"[: len(shape)]
    out = letters[:mode] + "z" + letters[mode + 1 :]
    expected = np.einsum(f"{letters},z{letters[mode]}->{out}", x, m)
    assert rel_err(mode_dot(to_backend(x, backend), to_backend(m, backend), mode), expected) < 1e-12


def test_mode_dot_vector_removes_mode(backend):
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    v = np.arange(3.0)
    got = mode_dot(to_backend(x, backend), to_backend(v, backend), 1)
    assert rel_err(got, np.einsum("ijk,j->ik", x, v)) < 1e-13


def test_multi_mode_dot_matches_tensorly():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5))
    ms = [rng.standard_normal((2, 3)), rng.standard_normal((6, 5))]
    expected = tl.tenalg.multi_mode_dot(x, ms, modes=[0, 2])
    assert rel_err(multi_mode_dot(x, ms, modes=[0, 2]), expected) < 1e-13


def test_mode_dot_errors_quote_both_shapes():
    with pytest.raises(ValueError, match=r"\(5, 4\).*\(2, 3, 4\)"):
        mode_dot(np.zeros((2, 3, 4)), np.zeros((5, 4)), 1)
    with pytest.raises(ValueError, match="out of range"):
        mode_dot(np.zeros((2, 3)), np.zeros((2, 3)), 2)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_unfold_matches_tensorly_and_folds_back(shape, data):
    mode = data.draw(st.integers(0, len(shape) - 1))
    x = np.random.default_rng(0).standard_normal(shape)
    u = unfold(x, mode)
    np.testing.assert_array_equal(u, tl.unfold(x, mode))
    np.testing.assert_array_equal(fold(u, mode, shape), x)


def test_fold_error():
    with pytest.raises(ValueError, match="does not fold"):
        fold(np.zeros((3, 5)), 0, (3, 4))
