"""The accelerator interface: the core names no accelerator, and one from outside plugs in."""

import pathlib
import re

import numpy as np
import pytest
from conftest import rel_err
from oracles import reference_conv

from tensorconv import KruskalKernel, TuckerKernel, accelerators, conv, plan_conv

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tensorconv"


def test_the_core_names_no_accelerator():
    """plans/, the cost model, backends/, cli/ and the package root never name the plane chain
    (its module, its kernel or its hooks): they reach it through the registry only."""
    pattern = re.compile(r"plane_chain|cp_chain|PlaneChain|_torch_cpu_chain|build_cpu_kernel")
    offenders = []
    for folder in ("plans", "backends", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code) and path.name != "bench_kernels.py":
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    for n, line in enumerate((ROOT / "__init__.py").read_text().splitlines(), 1):
        if pattern.search(line):
            offenders.append(f"__init__.py:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


class _Doubling(accelerators.Accelerator):
    """A toy accelerator for NumPy CP convs: runs the dense conv of the rebuilt kernel (an
    independent oracle) and records each call; ``seconds`` tiny so that auto takes it."""

    name = "toy"
    label = "toy"

    def __init__(self, decline=False):
        self.calls = []
        self.decline = decline

    def applies(self, structure, geometry=None):
        return structure.kind == "kruskal"

    def ready(self, backend_name, device, itemsize):
        return backend_name == "numpy"

    def seconds(self, structure, geometry, batch, itemsize, model):
        return 1e-12

    def spec(self, plan):
        g = plan.geometry
        return (g.stride, g.padding, g.dilation, g.padding_mode)

    def run(self, spec, backend, x, arrays):
        self.calls.append(spec)
        if self.decline or backend.name != "numpy":
            return None
        stride, padding, dilation, mode = spec
        lam, u_t, u_c, *spatial = arrays
        dense = KruskalKernel(lam, [u_t, u_c, *spatial]).to_dense()
        return reference_conv(x, dense, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)


@pytest.fixture
def toy():
    acc = accelerators.register(_Doubling())
    try:
        yield acc
    finally:
        accelerators.unregister("toy")


def test_a_registered_accelerator_is_priced_chosen_and_run_by_auto(toy):
    k = KruskalKernel.random((4, 3, 3, 3), 2, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 8))
    plan = plan_conv(k, x.shape, padding=1, stride=(1, 2))
    assert plan.strategy == "fused" and plan.accelerators == ("toy",), plan.estimates
    assert "fused (toy)" in plan.estimates and "toy" in plan.describe()
    got = plan(x, k)
    want = reference_conv(x, k.to_dense(), stride=(1, 2), padding=((1, 1), (1, 1)))
    assert len(toy.calls) == 1 and rel_err(got, want) < 1e-10
    # left out on request, and where it does not apply (a Tucker kernel)
    assert "fused (toy)" not in plan_conv(k, x.shape, padding=1, accelerators=()).estimates
    tk = TuckerKernel.random((4, 3, 3, 3), (2, 2), seed=0)
    assert plan_conv(tk, x.shape, padding=1).accelerators == ()


def test_a_declining_accelerator_falls_through_to_the_steps():
    acc = accelerators.register(_Doubling(decline=True))
    try:
        k = KruskalKernel.random((4, 3, 3, 3), 2, seed=1)
        x = np.random.default_rng(1).standard_normal((1, 3, 6, 6))
        got = conv(x, k, padding="same")
        assert acc.calls, "the accelerator was not asked"
        assert rel_err(got, reference_conv(x, k.to_dense(), padding=((1, 1), (1, 1)))) < 1e-10
    finally:
        accelerators.unregister("toy")


def test_fused_asks_the_accelerators_in_priority_order(toy):
    k = KruskalKernel.random((4, 3, 3, 3), 2, seed=0)
    plan = plan_conv(k, (1, 3, 6, 6), strategy="fused", padding=1)
    names = plan.accelerators
    assert names.index("toy") < names.index("torch_compile") < names.index("tiles"), names
    priorities = [accelerators.get(n).priority for n in names]
    assert priorities == sorted(priorities)


def test_registry_errors_name_what_is_wrong(toy):
    with pytest.raises(TypeError, match="Accelerator"):
        accelerators.register(object())
    with pytest.raises(ValueError, match="registered already"):
        accelerators.register(_Doubling())
    with pytest.raises(ValueError, match="no accelerator named 'nope'"):
        accelerators.unregister("nope")
    k = KruskalKernel.random((4, 3, 3, 3), 2, seed=0)
    with pytest.raises(ValueError, match=r"\['nope'\] not registered"):
        plan_conv(k, (1, 3, 6, 6), accelerators=("nope",))
    with pytest.raises(TypeError, match="sequence of names"):
        plan_conv(k, (1, 3, 6, 6), accelerators="toy")
