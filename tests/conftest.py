import contextlib
import os
import tempfile

# torch.compile's on-disk caches (inductor's FX graph cache) key a graph by its ops, not by a
# custom op's fake kernel: a cache left by an earlier run of other code would replay stale
# strides. Each test session compiles afresh, as a new user's machine does (unless the
# developer points TORCHINDUCTOR_CACHE_DIR somewhere on purpose).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tensorconv-inductor-"))

import numpy as np  # noqa: E402
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

try:
    import torch
except ImportError:  # the numpy tests still run
    torch = None


try:
    import jax

    # the equivalence tests run in float64 on every backend; jax needs 64-bit mode for that
    jax.config.update("jax_enable_x64", True)
except ImportError:
    jax = None


def _cuda():
    return torch is not None and torch.cuda.is_available()


def _cupy():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# jax is a test extra: CI must have it, so there a missing jax fails instead of skipping
needs_jax = pytest.mark.skipif(jax is None and not os.environ.get("CI"), reason="jax is not installed")

# (backend name, device) pairs; GPU entries skip with a reason where there is no GPU
BACKENDS = [
    pytest.param(("numpy", None), id="numpy"),
    pytest.param(
        ("torch", "cpu"), id="torch", marks=pytest.mark.skipif(torch is None, reason="torch is not installed")
    ),
    pytest.param(("jax", None), id="jax", marks=[needs_jax, pytest.mark.slow]),  # jit compiles: seconds each
    pytest.param(
        ("torch", "cuda"),
        id="torch-cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="no CUDA device")],
    ),
    pytest.param(
        ("cupy", 0), id="cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not _cupy(), reason="no CuPy with a GPU")]
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def to_backend(a, backend, dtype=None):
    """numpy array -> array of ``backend`` (name, device)."""
    name, device = backend
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    if name == "numpy":
        return a
    if name == "torch":
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    if name == "jax":
        return jax.numpy.asarray(a)
    import cupy

    with cupy.cuda.Device(device):
        return cupy.asarray(a)


def to_numpy(x):
    if isinstance(x, (np.ndarray, np.generic)):  # numpy reductions return scalars
        return np.asarray(x)
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if jax is not None and isinstance(x, jax.Array):
        return np.asarray(x)
    import cupy

    return cupy.asnumpy(x)


def rel_err(a, b):
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.abs(b).max(), 1e-300)
    return float(np.abs(a - b).max() / scale)


@contextlib.contextmanager
def native_torch_convs():
    """Run torch float64 plan steps through the native channels-last convs as float32 does.

    Plans on torch CPU send float64 steps to tap loops (oneDNN has no float64 kernels); the
    float64 equivalence tests use this to prove the native path too, at float64 precision."""
    from tensorconv.backends._torch_native import TorchConvs

    saved = TorchConvs.available
    TorchConvs.available = lambda self, itemsize, device=None: True
    try:
        yield
    finally:
        TorchConvs.available = saved


# -- the plane chain (tests/test_plane_chain.py, test_fused.py, test_export.py, test_conv.py) ---------------
@pytest.fixture(scope="module")
def plane_kernel():
    pytest.importorskip("torch")
    return _loaded_kernel()


def _loaded_kernel():
    """The compiled kernel; skips where this machine cannot build one (no C++ compiler or
    ninja, or TENSORCONV_NO_CPU_KERNEL set), fails where it has the tools and the build broke
    (a source that does not compile must not pass as 'skipped')."""
    import shutil

    pytest.importorskip("torch")
    from torch.utils.cpp_extension import is_ninja_available

    from tensorconv.accelerators.plane_chain import _build

    if _build.load() is not None:
        return _build
    if _build.disabled() or not is_ninja_available() or not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip("the CPU fused kernel cannot be built here (no C++ compiler / ninja, or disabled)")
    pytest.fail("a C++ compiler and ninja are here but the CPU fused kernel did not build (see the warning)")


@pytest.fixture
def chain_calls(plane_kernel, monkeypatch):
    """Counts calls of the compiled kernel, so a test knows the plane chain ran (not a fallback)."""
    from tensorconv.accelerators.plane_chain import _ops

    calls = []
    real = _ops.cp_chain_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_ops, "cp_chain_forward", spy)
    return calls


@pytest.fixture(scope="module")
def tv():
    """torchvision.models, importable beside the CPU torch wheel (see
    tensorconv._torchvision). torchvision is a test extra: CI fails without it (no skip
    there); a local run without it skips with the reason."""
    pytest.importorskip("torch")
    from tensorconv._torchvision import torchvision_models

    try:
        return torchvision_models()
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("torchvision is not installed (a test extra)")


def run_tiled(plan, tiles, x, kernel):
    """``tiles`` (a FusedRunner of ``plan``) on x, through the plan's public view only."""
    from tensorconv.backends import get_backend
    from tensorconv.plans.structure import weight_arrays

    backend = get_backend(x)
    arrays = weight_arrays(kernel, plan.structure, backend)
    return plan.finish(backend, tiles(backend, x, [None] + arrays))


needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def run_python(code, timeout=300, env=None):
    """Run ``code`` in a fresh interpreter; returns the completed process (never raises on rc):
    a crash or a hang there fails the test, not the run."""
    import subprocess
    import sys
    import textwrap

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=full_env
    )
