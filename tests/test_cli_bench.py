"""`tensorconv bench` runs end to end and writes what it promises (tiny settings, NumPy only)."""

import json

import pytest

from tensorconv.cli import main as cli_main


def test_bench_writes_json_with_environment_and_rows(tmp_path, capsys):
    assert (
        cli_main(
            [
                "bench",
                "fig6",
                "backends",
                "--quick",
                "--backend",
                "numpy",
                "--repeat",
                "1",
                "--allocator",
                "default",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "results.json").read_text())
    env = data["environment"]
    assert env["allocator"] == "glibc default" and env["numpy"]
    fig6 = [r for r in data["rows"] if r["suite"] == "fig6"]
    assert {r["model"] for r in fig6} == {"3D-Conv", "CP-HOConv-6", "CP-HOConv-3"}
    for r in fig6:  # the plan's MAC counts: dense C*C*27 per voxel, CP R*(2C + 9) per voxel
        c, voxels = r["channels"], 16 * 32 * 32
        if r["model"] == "3D-Conv":
            assert r["analytic_macs"] == voxels * c * c * 27
        else:
            rank = int(r["model"][-1]) * c
            assert r["analytic_macs"] == voxels * rank * (2 * c + 9)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    backends = [r for r in data["rows"] if r["suite"] == "backends"]
    assert backends and all(r["ratio_to_fastest"] >= 1.0 for r in backends)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "fig6.png").stat().st_size > 10_000


def test_importing_the_peer_leaves_tensorly_backend_alone():
    import tensorly

    from tensorconv.bench.common import import_tltorch

    before = tensorly.get_backend()
    if import_tltorch() is None:
        pytest.skip("tensorly-torch is not installed (optional benchmark peer)")
    assert tensorly.get_backend() == before


def test_quick_without_suites_runs_the_quick_set_and_times_each_suite(tmp_path, monkeypatch, capsys):
    """`tensorconv bench --quick` is the minute-long smoke run: the headline suites only (each
    other suite still takes --quick when named), with every suite's seconds in the JSON."""
    import tensorconv.bench as bench

    ran = []
    monkeypatch.setattr(bench, "_suite_function", lambda name: lambda args, targets: ran.append(name) or [])
    assert cli_main(["bench", "--quick", "--backend", "numpy", "--allocator", "default", "--out", str(tmp_path)]) == 0
    assert tuple(ran) == bench.QUICK_SUITES and set(bench.QUICK_SUITES) < set(bench.SUITES)
    env = json.loads((tmp_path / "results.json").read_text())["environment"]
    assert list(env["suite_seconds"]) == list(bench.QUICK_SUITES)
    ran.clear()
    assert cli_main(["bench", "decompose", "--quick", "--backend", "numpy", "--allocator", "default"]) == 0
    assert ran == ["decompose"]


@pytest.mark.slow
def test_bench_varlen_times_each_case_in_a_process_of_its_own(tmp_path):
    """The four cases (dense / factorized, 150 lengths / one), each timed in processes of its
    own; the ratios are those of the medians the rows give."""
    pytest.importorskip("torch")
    assert (
        cli_main(["bench", "varlen", "--quick", "--backend", "torch", "--allocator", "default", "--out", str(tmp_path)])
        == 0
    )
    rows = {r["case"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert list(rows) == [
        "dense, 150 lengths",
        "factorized, 150 lengths",
        "dense, one length",
        "factorized, one length",
    ]
    ms = {case: r["ms_per_forward"] for case, r in rows.items()}
    assert all(v > 0 for v in ms.values()) and {r["process"] for r in rows.values()} == {"one per case"}
    for case, r in rows.items():
        lo, hi = (float(v) for v in r["rounds_ms"].split("-"))
        assert lo <= r["ms_per_forward"] <= hi
        assert r["vs_factorized_one_length"] == pytest.approx(ms[case] / ms["factorized, one length"], abs=0.01)
    f = rows["factorized, 150 lengths"]
    assert f["dense_over_factorized"] == pytest.approx(ms["dense, 150 lengths"] / ms[f["case"]], abs=0.01)


@pytest.mark.slow
def test_bench_models_times_dense_and_factorized_in_every_runtime(tmp_path, monkeypatch):
    """The suite's plumbing on a tiny 3-D net (the real models take minutes): eager, the default
    torch.compile backend and ONNX Runtime (a test extra: no skip) each time both models, and
    each row says the process settings it ran with."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from tensorconv.bench.suites import models

    def tiny():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1), nn.Flatten())
        return net, "a tiny 3-D net"

    monkeypatch.setattr(models, "MODELS", {"tiny": (tiny, (3, 4, 8, 8), None)})
    argv = ["bench", "models", "--backend", "torch", "--repeat", "2", "--out", str(tmp_path)]
    try:
        assert cli_main(argv) == 0
    finally:  # no compiled nn.Sequential left to count against later tests' recompile limits
        torch._dynamo.reset()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    got = {(r["runtime"], r["batch"]) for r in rows}
    assert got == {(rt, b) for rt in models.RUNTIMES for b in (1, 8)}
    for r in rows:
        assert r["dense ms"] > 0 and r["factorized ms"] > 0
        # the ratio of the unrounded medians: within what rounding each ms to 0.01 and the ratio
        # to 0.01 leaves (the tiny net runs in fractions of a millisecond)
        d, f = r["dense ms"], r["factorized ms"]
        assert (d - 0.005) / (f + 0.005) - 0.005 <= r["speedup"] <= (d + 0.005) / max(f - 0.005, 1e-9) + 0.005
        assert r["factorized_params"] < r["dense_params"]
        assert "allocator: glibc default" in r["process"]
