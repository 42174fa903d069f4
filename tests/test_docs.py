"""Every Python snippet in the README and the docs runs as written.

Doctest blocks (``>>>``) run through pytest's ``--doctest-glob='*.md'`` over ``docs/``; the
other ``python`` blocks are whole scripts: each runs here in a fresh interpreter, in a temporary
folder (what it writes stays there), and must exit 0. A script that says it runs under torchrun
is run by torchrun with two processes.
"""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _scripts():
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for n, match in enumerate(BLOCK.finditer(path.read_text()), 1):
            code = match.group(1)
            if not code.lstrip().startswith(">>>"):
                found.append(pytest.param(code, id=f"{path.relative_to(ROOT)}#{n}"))
    return found


SCRIPTS = _scripts()


def test_the_docs_have_scripts_to_run():
    ids = {p.id for p in SCRIPTS}
    assert "README.md#1" in ids and any(i.startswith("docs/compress.md") for i in ids), ids


@pytest.mark.slow
@pytest.mark.parametrize("code", SCRIPTS)
def test_docs_script_runs_as_written(code, tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    if "torchrun --nproc-per-node 2" in code:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
