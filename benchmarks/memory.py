"""Peak memory of one forward+backward, dense Conv3d vs the unfused and fused CP plans (torch CPU).

Each configuration runs in a fresh process (so nothing is cached between them) and reports its
peak resident set size (getrusage ru_maxrss) after the step, minus the peak before it.
"fused" is what ``strategy="fused"`` runs with gradients at stride 1 (the plane chain and its
backward, which keeps only the input and the factors); "torch.compile" is the compiled chain
it used before (compiled first, outside the measured step).

    python benchmarks/memory.py
"""

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import torch
from tensorconv import KruskalKernel, conv
from tensorconv.cli.bench import _set_malloc_no_trim
_set_malloc_no_trim()
torch.set_num_threads(2)
b, c, mult, how = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if how == "compiled":
    from tensorconv.backends._torch import TorchBackend
    TorchBackend.cp_chain_3d = lambda self, *a, **kw: None  # torch.compile's path
    how = "fused"
x = torch.randn(b, c, 16, 32, 32, requires_grad=True)
k = KruskalKernel.random((c, c, 3, 3, 3), rank=mult * c, backend="torch", dtype="float32", seed=0)
w = torch.randn(c, c, 3, 3, 3, requires_grad=True)
for t in [k.weights] + list(k.factors):
    t.requires_grad_(True)
def step():
    if how == "dense":
        y = torch.nn.functional.conv3d(x, w, padding=1)
    else:
        y = conv(x, k, padding=1, strategy=how)
    y.sum().backward()
if how == "fused":
    small = torch.randn(1, c, 4, 4, 4)
    conv(small, k, padding=1, strategy="fused")        # warm the compiler's own memory first
    step()                                             # compiles this shape
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_increase_mib": (peak - base) / 1024}))
"""


def run(b, c, mult, how):
    out = subprocess.run([sys.executable, "-c", CHILD, str(b), str(c), str(mult), how], capture_output=True, text=True)
    if out.returncode:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_increase_mib"]


def main():
    print("| B | C | R | dense Conv3d MiB | factorized MiB | fused (plane chain) MiB | fused (torch.compile) MiB |")
    print("|---|---|---|---|---|---|---|")
    for b, c, mult in ((8, 32, 1), (8, 32, 3), (8, 64, 1)):
        cells = [run(b, c, mult, how) for how in ("dense", "factorized", "fused", "compiled")]
        print(f"| {b} | {c} | {mult}C | " + " | ".join("failed" if v is None else f"{v:.0f}" for v in cells) + " |")


if __name__ == "__main__":
    main()
