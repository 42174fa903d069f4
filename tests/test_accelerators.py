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
    """plans/, the cost model, backends/, cli/, bench/ and the package root never name the plane chain
    (its module, its kernel or its hooks): they reach it through the registry only."""
    pattern = re.compile(r"plane_chain|cp_chain|PlaneChain|_torch_cpu_chain|build_cpu_kernel")
    offenders = []
    for folder in ("plans", "backends", "cli", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code):
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


def test_an_installed_package_plugs_in_through_the_entry_point_group(monkeypatch):
    """A package that names its class in the group ``tensorconv.accelerators`` is registered on
    the first look-up, beside the built-ins; one that fails to load is a warning naming it."""

    class EntryPoint:
        def __init__(self, name, value):
            self.name, self.value = name, value

    declared = [EntryPoint("toy", "test_accelerators:_Doubling"), EntryPoint("broken", "no_such_module:Thing")]
    monkeypatch.setattr(
        accelerators, "entry_points", lambda group: declared if group == accelerators.ENTRY_POINT_GROUP else []
    )
    monkeypatch.setattr(accelerators, "_loaded", [])  # as in a fresh process
    try:
        with pytest.warns(RuntimeWarning, match="no_such_module:Thing"):
            names = [a.name for a in accelerators.registered()]
        assert "toy" in names and "plane_chain" in names, names
        k = KruskalKernel.random((4, 3, 3, 3), 2, seed=0)
        assert plan_conv(k, (1, 3, 6, 6), padding=1).accelerator == "toy"
    finally:
        if "toy" in [a.name for a in accelerators.registered()]:
            accelerators.unregister("toy")


def test_a_new_folder_here_is_a_new_built_in_accelerator(tmp_path, monkeypatch):
    """A built-in accelerator is one folder under tensorconv/accelerators/ whose package names its
    class ACCELERATOR: nothing else in tensorconv lists it."""
    folder = tmp_path / "folder_toy"
    folder.mkdir()
    (folder / "__init__.py").write_text(
        "from tensorconv.accelerators import Accelerator\n"
        "class FolderToy(Accelerator):\n"
        "    name = 'folder_toy'\n"
        "    def applies(self, structure, geometry=None):\n"
        "        return False\n"
        "ACCELERATOR = FolderToy\n"
    )
    monkeypatch.setattr(accelerators, "__path__", list(accelerators.__path__) + [str(tmp_path)])
    monkeypatch.setattr(accelerators, "_loaded", [])  # as in a fresh process
    try:
        names = [a.name for a in accelerators.registered()]
        assert "folder_toy" in names and "plane_chain" in names, names
    finally:
        if "folder_toy" in [a.name for a in accelerators.registered()]:
            accelerators.unregister("folder_toy")


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


def test_unregister_reaches_the_plans_conv_cached(toy):
    """conv() keys its cached plans by the registry: after unregister (or a new accelerator under
    the old name) a cached plan never runs the removed one."""
    k = KruskalKernel.random((4, 3, 3, 3), 2, seed=3)
    x = np.random.default_rng(3).standard_normal((1, 3, 6, 7))
    for strategy in ("auto", "fused"):
        toy.calls.clear()
        conv(x, k, padding=1, strategy=strategy)
        assert toy.calls, strategy
    accelerators.unregister("toy")
    try:
        for strategy in ("auto", "fused"):
            before = len(toy.calls)
            got = conv(x, k, padding=1, strategy=strategy)
            assert len(toy.calls) == before, f"{strategy}: the unregistered accelerator still ran"
            assert rel_err(got, reference_conv(x, k.to_dense(), padding=((1, 1), (1, 1)))) < 1e-10
        fresh = accelerators.register(_Doubling())
        conv(x, k, padding=1)
        assert fresh.calls and len(toy.calls) == before
    finally:
        accelerators.unregister("toy")
        accelerators.register(toy)  # the fixture unregisters it


# -- a toy accelerator for torch, through the public API only ------------------------------------------------------
class _TorchToy(accelerators.Accelerator):
    """Serves CP convs of torch CPU tensors (zero padding) by the rebuilt kernel's dense conv,
    counting its calls. Nothing outside this class tells tensorconv about it."""

    name = "torch_toy"
    label = "torch toy"
    priority = 5

    def __init__(self):
        self.calls = 0

    def applies(self, structure, geometry=None):
        return structure.kind == "kruskal" and 1 <= structure.n_spatial <= 3

    def serves_device(self, backend_name, device_type):
        return backend_name == "torch" and device_type == "cpu"

    def ready(self, backend_name, device, itemsize):
        return self.serves_device(backend_name, None if device is None else str(getattr(device, "type", device)))

    def seconds(self, structure, geometry, batch, itemsize, model):
        return 1e-12

    def spec(self, plan):
        return plan.geometry

    def run(self, geometry, backend, x, arrays):
        import torch.nn.functional as F

        if backend.name != "torch" or geometry.padding_mode != "zeros" or not geometry.is_symmetric_padding:
            return None
        self.calls += 1
        lam, u_t, u_c, *spatial = arrays
        dense = KruskalKernel(lam, [u_t, u_c, *spatial]).to_dense()
        convnd = (F.conv1d, F.conv2d, F.conv3d)[geometry.n_spatial - 1]
        pads = tuple(lo for lo, _ in geometry.padding)
        return convnd(x, dense, None, geometry.stride, pads, geometry.dilation)


@pytest.fixture
def torch_toy_alone():
    """The toy registered, and the plane chain not: the toy is then the only accelerator of torch
    CPU, as a kernel for a device tensorconv ships nothing for would be."""
    pytest.importorskip("torch")
    chain = accelerators.unregister("plane_chain")
    toy = accelerators.register(_TorchToy())
    try:
        yield toy
    finally:
        accelerators.unregister(toy.name)
        accelerators.register(chain)


def test_a_torch_accelerator_is_priced_chosen_run_and_recorded_under_compile(torch_toy_alone):
    import torch
    import torch.nn.functional as F

    from tensorconv.nn import KruskalConv

    toy = torch_toy_alone
    assert accelerators.for_device("torch", torch.device("cpu")) == (toy,)
    k = KruskalKernel.random((4, 3, 3, 3, 3), 2, backend="torch", dtype="float64", seed=0)
    x = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    plan = plan_conv(k, tuple(x.shape), padding=1)
    assert plan.strategy == "fused" and plan.accelerator == "torch_toy", plan.estimates
    assert rel_err(plan(x, k), F.conv3d(x, k.to_dense(), padding=1)) < 1e-10 and toy.calls == 1

    layer = KruskalConv(3, 4, (3, 3, 3), rank=2, padding=1).double()
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=recording, fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
        want = F.conv3d(x, layer.kernel.to_dense(), layer.bias, padding=1)
    assert "tensorconv.cp_conv" in graphs[-1], graphs[-1]  # the plan recorded as one op
    assert rel_err(got, want) < 1e-10 and toy.calls == 2  # and the op ran the toy
    # a device no accelerator serves: standard convs are recorded (the registry decides, not a device name)
    accelerators.unregister(toy.name)
    try:
        torch._dynamo.reset()
        with torch.no_grad():
            again = torch.compile(layer, backend=recording, fullgraph=True)(x)
        assert "tensorconv.cp_conv" not in graphs[-1] and "conv3d" in graphs[-1], graphs[-1]
        assert rel_err(again, want) < 1e-10 and toy.calls == 2
    finally:
        accelerators.register(toy)
        torch._dynamo.reset()


@pytest.mark.slow
def test_a_torch_accelerator_runs_under_compile_with_the_default_backend(torch_toy_alone):
    """What users run: torch.compile's default backend (inductor) compiles the layer around the
    opaque op, and the op runs the accelerator."""
    import torch
    import torch.nn.functional as F

    from tensorconv.nn import KruskalConv

    layer = KruskalConv(3, 4, (3, 3, 3), rank=2, padding=1).double()
    x = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(layer, fullgraph=True)(x)
            want = F.conv3d(x, layer.kernel.to_dense(), layer.bias, padding=1)
    finally:
        torch._dynamo.reset()
    assert rel_err(got, want) < 1e-10 and torch_toy_alone.calls >= 1


@pytest.mark.slow
def test_tensorconv_bench_benchmarks_a_torch_accelerator(torch_toy_alone, tmp_path):
    import json

    from tensorconv.cli import main

    argv = ["bench", "accelerators", "--quick", "--repeat", "1", "--backend", "torch", "--allocator", "default"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["accelerators"] == {"torch_toy": True}
    rows = [r for r in results["rows"] if r["suite"] == "accelerators"]
    assert rows and {r["accelerator"] for r in rows} == {"torch_toy"}
    assert {r["auto runs"] for r in rows if r["pass_"] == "forward"} == {"torch_toy"}
    assert torch_toy_alone.calls > 0
