import subprocess
import sys

import numpy as np
import pytest
from conftest import rel_err, to_backend, to_numpy, torch

from tensorconv.backends import backend_for_name, get_backend

_NP_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def test_import_does_not_import_frameworks():
    code = (
        "import sys, tensorconv; bad = [m for m in ('torch', 'cupy', 'jax') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_get_backend_by_type_and_cached(backend):
    x = to_backend(np.zeros(3), backend)
    b = get_backend(x, None, x)
    assert b.name == backend[0]
    assert get_backend(x) is b


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_mixed_backends_is_type_error_naming_types():
    with pytest.raises(TypeError, match=r"numpy\.ndarray.*torch\.Tensor"):
        get_backend(np.zeros(2), torch.zeros(2))


def test_non_array_is_type_error():
    with pytest.raises(TypeError, match="list"):
        get_backend([1.0, 2.0])
    with pytest.raises(TypeError, match="at least one array"):
        get_backend(None)
    with pytest.raises(ValueError, match="tensorflow.*one of"):
        backend_for_name("tensorflow")


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_pad_matches_numpy_pad(backend, mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4))
    b = backend_for_name(backend[0])
    got = b.pad(to_backend(x, backend), {1: (2, 3), 2: (1, 0)}, mode)
    expected = np.pad(x, ((0, 0), (2, 3), (1, 0)), mode=_NP_MODES[mode])
    assert rel_err(got, expected) == 0.0


def test_pad_reflect_too_large_is_value_error():
    b = backend_for_name("numpy")
    with pytest.raises(ValueError, match="reflect"):
        b.pad_axis(np.zeros((2, 3)), 1, 3, 0, "reflect")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_round_trip_keeps_dtype_and_device(backend, dtype):
    b = backend_for_name(backend[0])
    x = to_backend(np.arange(6.0).reshape(2, 3), backend, dtype=dtype)
    host = b.to_numpy(x)
    assert isinstance(host, np.ndarray) and host.dtype == np.dtype(dtype)
    back = b.from_numpy(host, like=x)
    assert type(back) is type(x) and b.dtype(back) == b.dtype(x) and b.device(back) == b.device(x)
    np.testing.assert_array_equal(to_numpy(back), host)


def test_einsum_and_tensordot_agree_with_numpy(backend):
    rng = np.random.default_rng(2)
    a, m = rng.standard_normal((3, 4, 5)), rng.standard_normal((4, 6))
    b = backend_for_name(backend[0])
    A, M = to_backend(a, backend), to_backend(m, backend)
    assert rel_err(b.einsum("ijk,jl->ilk", A, M), np.einsum("ijk,jl->ilk", a, m)) < 1e-13
    assert rel_err(b.tensordot(A, M, axes=([1], [0])), np.tensordot(a, m, axes=([1], [0]))) < 1e-13
    assert tuple(b.moveaxis(A, 0, -1).shape) == (4, 5, 3)
    assert tuple(b.reshape(A, (12, 5)).shape) == (12, 5)


def test_package_ships_its_license_and_typing_marker():
    import os

    import tomllib

    import tensorconv

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)
    assert project["project"]["license"]["text"] == "BSD-3-Clause"
    with open(os.path.join(root, "LICENSE")) as fh:
        assert fh.readline().strip() == "BSD 3-Clause License"
    assert os.path.exists(os.path.join(os.path.dirname(tensorconv.__file__), "py.typed"))
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["tensorconv"]


def test_backends_import_nothing_from_the_layers_above():
    """Dependencies flow one way: backends <- core (kernels, plans) <- nn / cli. A backend that
    imported plans/ would tie the array shims to the planner."""
    import ast
    import pathlib

    import tensorconv.backends

    above = ("plans", "kernels", "nn", "cli", "architectures", "decomposition", "metrics")
    for path in pathlib.Path(tensorconv.backends.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert (node.module or "").split(".")[0] not in above, (path.name, node.module)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("tensorconv.") and n.split(".")[1] in above for n in names), path.name


@pytest.mark.parametrize("name", ["numpy", "jax"])
def test_bfloat16_of_ml_dtypes_is_a_floating_dtype(name):
    """jax's bfloat16 (and numpy's, through ml_dtypes) is a floating dtype: a conv runs in it and
    agrees with float32 to bfloat16's precision (8 bits of mantissa: rel 3e-2)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from tensorconv import KruskalKernel, conv

    if name == "jax":
        jnp = pytest.importorskip("jax.numpy")
        as_array = lambda a, dtype: jnp.asarray(a, dtype=dtype)  # noqa: E731
    else:
        as_array = lambda a, dtype: np.asarray(a, dtype=dtype)  # noqa: E731
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    k32 = KruskalKernel.random((4, 3, 3, 3), 2, dtype="float32", seed=0)
    kb = KruskalKernel(
        as_array(k32.weights, ml_dtypes.bfloat16), [as_array(f, ml_dtypes.bfloat16) for f in k32.factors]
    )
    xb = as_array(x, ml_dtypes.bfloat16)
    assert backend_for_name(name).is_floating(xb)
    got = conv(xb, kb, padding=1)
    assert str(got.dtype) == "bfloat16"
    want = conv(x, k32, padding=1)
    assert rel_err(np.asarray(got, dtype=np.float32), want) < 3e-2
