"""The command line: flags checked before any work, outputs opened before the run."""

import json

import pytest
from conftest import run_python

from tensorconv.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "--seed", "-1"], "--seed: must be an int >= 0"),
        (["verify", "--cases", "0"], "--cases: must be an int >= 1"),
        (["verify", "--json", "/nonexistent-dir/rows.json"], "--json /nonexistent-dir/rows.json: cannot write"),
        # as root os.access says yes to /proc files; opening one for writing does not
        (["verify", "--json", "/proc/version"], "--json /proc/version: cannot write"),
        (["bench", "--batch", "0"], "--batch: must be an int >= 1"),
        (["bench", "--repeat", "-2"], "--repeat: must be an int >= 1"),
        (["bench", "--out", "/proc/tensorconv-results"], "cannot create that folder"),
        (["bench", "--out", "/proc/self"], "--out /proc/self: cannot write /proc/self/results.json"),
    ],
)
def test_cli_flags_and_outputs_are_checked_before_the_run(argv, message, capsys, monkeypatch):
    import tensorconv.bench as bench
    import tensorconv.cli.verify as verify

    def never(*args, **kwargs):
        raise AssertionError("the run started before its output was known to be writable")

    monkeypatch.setattr(verify, "run", never)
    monkeypatch.setattr(bench, "_targets", never)
    with pytest.raises(SystemExit) as info:
        main(argv)
    said = str(info.value.code) + capsys.readouterr().err
    assert message in said and info.value.code != 0


def test_verify_json_replaces_an_existing_file_after_the_run(tmp_path, capsys):
    out = tmp_path / "rows.json"
    out.write_text("an older, longer file that must not survive in part " * 20)
    assert main(["verify", "--backend", "numpy", "--derivation", "cp", "--cases", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["derivation"] for r in rows] == ["cp"] and rows[0]["passed"]


def test_verify_json_carries_the_papers_names(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["verify", "--backend", "numpy", "--derivation", "bottleneck", "--derivation", "cp", "--cases", "1"]
    assert main(argv + ["--json", str(out)]) == 0
    rows = {r["derivation"]: r for r in json.loads(out.read_text())}
    assert rows["tucker"]["paper_name"] == "bottleneck" and rows["tucker"]["label"] == "tucker/bottleneck"
    assert rows["cp"]["paper_name"] == "kruskal" and rows["cp"]["label"] == "cp/kruskal"
    assert "tucker/bottleneck" in capsys.readouterr().out


def test_verify_seed_is_reproducible_across_processes():
    code = """
    from tensorconv.cli.verify import run
    rows = run(["numpy"], ("float64",), 2, 7, ["cp", "tucker"], progress=False)
    print(repr([(r["derivation"], r["max_abs"], r["max_rel"], r["passed"]) for r in rows]))
    """
    outs = [run_python(code, env={"PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    assert all(p.returncode == 0 for p in outs), [p.stderr[-2000:] for p in outs]
    assert outs[0].stdout == outs[1].stdout and outs[0].stdout.strip()
