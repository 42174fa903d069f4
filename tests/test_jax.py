"""The JAX backend: the same plans under jax.jit, jax.grad and jax.vmap.

Oracles: torch's F.convNd and torch autograd on the same numbers, central finite differences,
and a Python loop for vmap. jax is a test extra, so CI runs all of this (no skip there: the
module fails to import if jax is missing while CI is set).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import rel_err, torch
from oracles import reference_conv

if not os.environ.get("CI"):
    pytest.importorskip("jax", reason="jax is not installed (pip install -e '.[jax]')")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tensorconv import KruskalKernel, TuckerKernel, conv, mode_dot, plan_conv  # noqa: E402
from tensorconv.backends import get_backend  # noqa: E402

pytestmark = pytest.mark.slow  # every test jit-compiles (seconds each); CI runs them

TOL = 1e-10
GEOMETRIES = [
    # (kernel shape, input spatial, geometry)
    ((4, 3, 3), (11,), dict(stride=2, padding=((1, 2),), dilation=1)),
    ((4, 3, 3, 2), (7, 6), dict(stride=(1, 2), padding="same" and ((1, 1), (0, 1)), dilation=(2, 1))),
    ((5, 3, 3, 3, 3), (6, 5, 7), dict(stride=1, padding=1, dilation=1, padding_mode="reflect")),
]


def _kernel(kind, shape, seed=0):
    if kind == "cp":
        return KruskalKernel.random(shape, rank=4, backend="jax", seed=seed)
    spatial_rank = (2,) * (len(shape) - 2) if seed % 2 else None  # None: identity spatial factors
    return TuckerKernel.random(shape, (3, 2), spatial_rank=spatial_rank, backend="jax", seed=seed)


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _geo_for_oracle(geo, n):
    out = dict(geo)
    p = out.get("padding", 0)
    if isinstance(p, int):
        out["padding"] = ((p, p),) * n
    return out


@pytest.mark.parametrize("kind", ["cp", "tucker"])
@pytest.mark.parametrize("case", range(len(GEOMETRIES)))
@pytest.mark.parametrize("strategy", ["auto", "factorized", "reconstructed"])
def test_jit_equals_eager_and_the_dense_oracle(kind, case, strategy):
    kshape, spatial, geo = GEOMETRIES[case]
    k = _kernel(kind, kshape)
    x = _x((2, kshape[1]) + spatial)
    eager = conv(x, k, strategy=strategy, **geo)
    jitted = jax.jit(lambda x, k: conv(x, k, strategy=strategy, **geo))(x, k)
    assert isinstance(eager, jax.Array) and isinstance(jitted, jax.Array)
    expected = reference_conv(np.asarray(x), np.asarray(k.to_dense()), **_geo_for_oracle(geo, len(spatial)))
    assert rel_err(eager, expected) < TOL
    assert rel_err(jitted, expected) < TOL


def test_jit_traces_once_per_shape():
    """Plans depend on shapes only: new values of the same shapes reuse the trace."""
    traces = []

    @jax.jit
    def f(x, k):
        traces.append(1)
        return conv(x, k, padding=1)

    k = _kernel("cp", (4, 3, 3, 3))
    for seed in range(3):
        f(_x((2, 3, 8, 8), seed), _kernel("cp", (4, 3, 3, 3), seed))
    assert len(traces) == 1
    f(_x((1, 3, 9, 8)), k)
    assert len(traces) == 2


def _torch_grads(x, k, kind, geo, strategy):
    """The same loss through torch autograd (tensorconv on torch) -> numpy gradients."""
    tx = torch.from_numpy(np.asarray(x)).requires_grad_(True)
    if kind == "cp":
        tw = torch.from_numpy(np.asarray(k.weights)).requires_grad_(True)
        tf = [torch.from_numpy(np.asarray(f)).requires_grad_(True) for f in k.factors]
        tk = KruskalKernel(tw, tf)
        leaves = [tx, tw] + tf
    else:
        tc = torch.from_numpy(np.asarray(k.core)).requires_grad_(True)
        tf = [None if f is None else torch.from_numpy(np.asarray(f)).requires_grad_(True) for f in k.factors]
        tk = TuckerKernel(tc, tf)
        leaves = [tx, tc] + [f for f in tf if f is not None]
    out = conv(tx, tk, strategy=strategy, **geo)
    (out * torch.sin(out)).sum().backward()
    return [t.grad.numpy() for t in leaves]


@pytest.mark.parametrize("kind", ["cp", "tucker"])
@pytest.mark.parametrize("strategy", ["factorized", "reconstructed"])
@pytest.mark.parametrize("case", [0, 1, 2])
def test_grad_wrt_input_and_every_factor_equals_torch_and_finite_differences(kind, strategy, case):
    kshape, spatial, geo = GEOMETRIES[case]
    k = _kernel(kind, kshape, seed=case)
    x = _x((2, kshape[1]) + spatial, seed=case + 7)

    def loss(x, k):
        out = conv(x, k, strategy=strategy, **geo)
        return jnp.sum(out * jnp.sin(out))

    gx, gk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k)
    assert isinstance(gk, type(k))  # kernels are pytrees: the gradient is a kernel of the same form
    first = gk.weights if kind == "cp" else gk.core
    got = [gx, first] + [f for f in gk.factors if f is not None]  # None: an identity factor
    if torch is not None:
        for g, t in zip(got, _torch_grads(x, k, kind, geo, strategy)):
            assert rel_err(g, t) < TOL
    # central finite differences along one random direction per argument
    leaves, tree = jax.tree_util.tree_flatten((x, k))
    rng = np.random.default_rng(case)
    grads = jax.tree_util.tree_leaves((gx, gk))
    h = 1e-5
    for i, (leaf, g) in enumerate(zip(leaves, grads)):
        d = jnp.asarray(rng.standard_normal(leaf.shape))
        plus = [lf + h * d if j == i else lf for j, lf in enumerate(leaves)]
        minus = [lf - h * d if j == i else lf for j, lf in enumerate(leaves)]
        fd = (loss(*jax.tree_util.tree_unflatten(tree, plus)) - loss(*jax.tree_util.tree_unflatten(tree, minus))) / (
            2 * h
        )
        analytic = float(jnp.vdot(g, d))
        assert abs(float(fd) - analytic) <= 1e-6 * max(1.0, abs(analytic)), (i, float(fd), analytic)


def test_vmap_over_a_batch_of_kernels_equals_a_loop():
    base = _kernel("cp", (4, 3, 3, 3))
    x = _x((2, 3, 8, 7))
    scales = jnp.asarray([0.5, 1.0, -2.0])
    kernels = jax.vmap(lambda s: KruskalKernel(base.weights * s, [f * (1 + s) for f in base.factors]))(scales)
    batched = jax.vmap(lambda k: conv(x, k, padding=1))(kernels)
    for i, s in enumerate(np.asarray(scales)):
        one = KruskalKernel(base.weights * s, [f * (1 + s) for f in base.factors])
        expected = reference_conv(np.asarray(x), np.asarray(one.to_dense()), padding=((1, 1), (1, 1)))
        assert rel_err(batched[i], expected) < TOL


def test_kernels_are_pytrees_that_round_trip():
    for k in (_kernel("cp", (4, 3, 3, 3)), _kernel("tucker", (4, 3, 3, 3))):
        leaves, tree = jax.tree_util.tree_flatten(k)
        back = jax.tree_util.tree_unflatten(tree, leaves)
        assert type(back) is type(k) and back.shape == k.shape
        assert rel_err(back.to_dense(), np.asarray(k.to_dense())) == 0.0


def test_kernel_methods_on_jax_return_jax_arrays():
    rng = np.random.default_rng(0)
    k = KruskalKernel.random((5, 4, 3, 3), rank=3, seed=1)  # numpy
    dense = jnp.asarray(k.to_dense())
    fitted = KruskalKernel.from_dense(dense, 3, n_iter_max=300, tol=1e-14)
    assert get_backend(fitted.weights).name == "jax"
    assert fitted.relative_error(dense) < 1e-6
    tucker = TuckerKernel.from_dense(dense, (5, 4))
    assert get_backend(tucker.core).name == "jax" and tucker.relative_error(dense) < 1e-10
    kj = k.to_backend("jax")
    assert rel_err(kj.to_dense(), k.to_dense()) == 0.0
    tr = kj.transduct(3, init="center")
    assert get_backend(tr.weights).name == "jax" and tr.shape == (5, 4, 3, 3, 3)
    m = rng.standard_normal((6, 4))
    x = rng.standard_normal((2, 4, 5))
    assert rel_err(mode_dot(jnp.asarray(x), jnp.asarray(m), 1), np.einsum("tc,bcd->btd", m, x)) < TOL
    assert plan_conv(kj, (2, 4, 8, 8), padding=1, backend="jax").strategy in ("factorized", "reconstructed")


def test_mixing_jax_with_another_library_is_a_type_error():
    k = _kernel("cp", (4, 3, 3, 3))
    with pytest.raises(TypeError, match=r"numpy\.ndarray.*jax"):
        conv(np.ones((1, 3, 5, 5)), k)
    with pytest.raises(TypeError, match="cannot be mixed"):
        KruskalKernel(jnp.ones(2), [np.ones((4, 2)), jnp.ones((3, 2)), jnp.ones((3, 2)), jnp.ones((3, 2))])


def test_float64_without_x64_is_a_clear_error_not_a_silent_float32():
    code = (
        "import jax; from tensorconv import KruskalKernel\n"
        "try:\n    KruskalKernel.random((4, 3, 3), rank=2, backend='jax')\n"
        "except ValueError as e:\n    print(e)\n"
    )
    env = dict(os.environ, JAX_ENABLE_X64="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "jax_enable_x64" in out.stdout and "dtype='float32'" in out.stdout, out.stdout + out.stderr


def test_verify_runs_every_derivation_on_jax(capsys):
    from tensorconv.cli import main

    assert main(["verify", "--backend", "jax", "--cases", "1"]) == 0
    table = capsys.readouterr().out
    assert "jax" in table and "FAIL" not in table
    assert "tucker" in table and "r2plus1d" in table


def test_tree_map_keeps_each_kernels_own_backend():
    """Once the jax backend is loaded, kernels of other libraries stay theirs through
    jax.tree_util (a kernel of torch tensors is not relabelled jax), and a tree_map that converts
    the leaves gives a kernel of the new library."""
    import tensorconv.backends as backends

    backends.backend_for_name("jax")  # registers the pytrees
    kernels = [KruskalKernel.random((4, 3, 3, 3), 2, seed=0)]
    if torch is not None:
        kernels.append(KruskalKernel.random((4, 3, 3, 3), 2, backend="torch", seed=0))
        kernels.append(TuckerKernel(torch.randn(2, 2, 3), [torch.randn(4, 2), torch.randn(3, 2)]))
    for k in kernels:
        copied = jax.tree_util.tree_map(lambda a: a + 0, k)
        assert copied.backend.name == k.backend.name
        assert rel_err(copied.astype("float32").to_dense(), k.to_dense()) < 1e-6
    moved = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), kernels[0])
    assert moved.backend.name == "jax" and isinstance(moved.to_dense(), jax.Array)
