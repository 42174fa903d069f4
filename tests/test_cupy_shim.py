"""The CuPy code paths, run on the CPU through a stand-in `cupy` module built on NumPy.

Real CuPy is tested on a GPU (the `cupy` backend parameter of the other tests, skipped without
one). This stand-in only proves that the CuPy-specific code (device contexts, asnumpy,
detection by type, opt_einsum's dispatch to the `cupy` namespace) is wired right, on every CI
run: arrays are a NumPy subclass whose type says it comes from `cupy`.
"""

import sys
import types

import numpy as np
import pytest
from conftest import rel_err, run_tiled

import tensorconv.backends as backends_mod
from tensorconv import KruskalKernel, TuckerKernel, conv, get_backend, plan_conv
from tensorconv.plans.fused import FusedRunner


class _Device:
    def __init__(self, index=0):
        self.id = index

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def synchronize(self):
        pass


class FakeCupyArray(np.ndarray):
    __module__ = "cupy"

    @property
    def device(self):
        return _Device(0)


def _wrap(x):
    return x.view(FakeCupyArray) if isinstance(x, np.ndarray) and not isinstance(x, FakeCupyArray) else x


def _make_shim():
    shim = types.ModuleType("cupy")
    shim.ndarray = FakeCupyArray
    shim.cuda = types.SimpleNamespace(Device=_Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    shim.asnumpy = lambda x: np.array(x, copy=True).view(np.ndarray)

    def __getattr__(name):
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type):
            return lambda *a, **k: _wrap(attr(*a, **k))
        return attr

    shim.__getattr__ = __getattr__
    return shim


@pytest.fixture
def fake_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _make_shim())
    # backends are cached per name and per type: start clean, leave clean
    monkeypatch.setattr(backends_mod, "_by_name", {})
    monkeypatch.setattr(backends_mod, "_by_type", {})
    yield sys.modules["cupy"]


def test_detection_conversion_and_kernels(fake_cupy):
    x = fake_cupy.asarray(np.arange(6.0).reshape(2, 3))
    b = get_backend(x)
    assert b.name == "cupy" and b.device(x) == _Device(0)
    with pytest.raises(TypeError, match="different libraries"):
        get_backend(x, np.zeros(2))
    k = KruskalKernel.random((4, 3, 3, 2), rank=3, backend="cupy", seed=0)
    assert isinstance(k.weights, FakeCupyArray)
    ref = KruskalKernel.random((4, 3, 3, 2), rank=3, backend="numpy", seed=0)
    assert rel_err(k.to_dense(), ref.to_dense()) < 1e-12
    back = k.to_backend("numpy")
    assert type(back.weights) is np.ndarray and rel_err(back.to_dense(), ref.to_dense()) < 1e-12


@pytest.mark.parametrize("strategy", ["factorized", "reconstructed", "fused"])
def test_conv_on_the_cupy_code_path_equals_numpy(fake_cupy, strategy):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    kernels = [
        KruskalKernel.random((4, 3, 3, 2), rank=3, seed=1),
        KruskalKernel.random((4, 3, 3, 3), rank=3, modes=[(0,), (1,), (2, 3)], seed=2),
        TuckerKernel.random((4, 4, 3, 3), (2, 2), groups=2, seed=3),
    ]
    for k in kernels:
        xin = x if k.in_channels == 3 else rng.standard_normal((2, 4, 7, 6))
        kw = dict(stride=(2, 1), padding=((1, 0), 1), padding_mode="reflect")
        expected = conv(xin, k, strategy="factorized", **kw)
        kc = k.to_backend("cupy")
        xc = fake_cupy.asarray(xin)
        got = conv(xc, kc, strategy=strategy, **kw)
        assert isinstance(got, FakeCupyArray)
        assert rel_err(got, expected) < 1e-10
    dense = rng.standard_normal((6, 3, 3, 3))
    assert (
        rel_err(conv(fake_cupy.asarray(x), fake_cupy.asarray(dense), padding="same"), conv(x, dense, padding="same"))
        < 1e-10
    )


def test_tiles_on_the_cupy_code_path(fake_cupy):
    k = KruskalKernel.random((4, 3, 3, 3), rank=3, seed=4)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 5))
    plan = plan_conv(k, x.shape, padding=1, strategy="fused", backend="cupy")
    tiles = FusedRunner(plan, tile_bytes=1)  # one output row per tile
    got = run_tiled(plan, tiles, fake_cupy.asarray(x), k.to_backend("cupy"))
    assert rel_err(got, conv(x, k, padding=1, strategy="factorized")) < 1e-10
