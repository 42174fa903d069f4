"""``tensorconv bench memory``: see :func:`run`."""

from __future__ import annotations

import json
import subprocess
import sys

from ..common import _torch_cpu
from ..timing import _Progress

_MEMORY = r"""
import json, sys
import torch
from tensorconv import KruskalKernel, conv
from tensorconv.bench.environment import _set_malloc_no_trim
_set_malloc_no_trim()
torch.set_num_threads(2)
b, c, mult, how = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x = torch.randn(b, c, 16, 32, 32, requires_grad=True)
k = KruskalKernel.random((c, c, 3, 3, 3), rank=mult * c, backend="torch", dtype="float32", seed=0)
w = torch.randn(c, c, 3, 3, 3, requires_grad=True)
for t in [k.weights] + list(k.factors):
    t.requires_grad_(True)
def step():
    y = torch.nn.functional.conv3d(x, w, padding=1) if how == "dense" else conv(x, k, padding=1, strategy=how)
    y.sum().backward()
def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
conv(torch.randn(1, c, 4, 4, 4), k, padding=1, strategy="fused")  # the kernel's library loaded first
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts from here
base, _ = rss()
step()
_, peak = rss()
print(json.dumps({"mib": (peak - base) / 2**20}))
"""


def run(args, targets):
    """Peak memory of one forward+backward (torch CPU, float32, (B, C, 16, 32, 32), 3x3x3, rank
    R): dense Conv3d, the unfused CP plan, and ``fused`` (the plane chain and its backward, which
    keeps only the input and the factors). Each in a fresh process (Linux): its peak resident
    set (VmHWM, reset just before the step) minus its resident set then."""
    if not _torch_cpu(targets):
        return []
    points = [(8, 32, 1)] if args.quick else [(8, 32, 1), (8, 32, 3), (8, 64, 1)]
    rows = []
    prog = _Progress(len(points), "memory")
    for b, c, mult in points:
        cells = {}
        for how in ("dense", "factorized", "fused"):
            out = subprocess.run(
                [sys.executable, "-c", _MEMORY, str(b), str(c), str(mult), how], capture_output=True, text=True
            )
            cells[f"{how} MiB"] = (
                round(json.loads(out.stdout.strip().splitlines()[-1])["mib"]) if out.returncode == 0 else "failed"
            )
        rows.append(dict(suite="memory", B=b, C=c, R=f"{mult}C", **cells))
        prog.step(f"B={b} C={c} R={mult}C")
    prog.close()
    return rows
