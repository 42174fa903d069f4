"""The `tensorconv bench varlen` case as a script that times whichever tensorconv is imported, so
that two checkouts compare in one sitting (the suite exists only in the newer one):

    PYTHONPATH=/path/to/before python benchmarks/varlen_ab.py
    PYTHONPATH=/path/to/after  python benchmarks/varlen_ab.py

A 6-layer Conv1d model (kernel 3, 32 -> 128 channels, batch 8), dense and factorize(0.25), fed
150 lengths (100..249) in turn, and 150 batches of one length (175; ``--one-tensor``: one
batch 150 times, as before 2026-12-07); milliseconds per forward, medians of 7 sweeps in a
shuffled order after 2 warm-up sweeps. ``--fixed-only`` times the one
length alone, as a process that never meets another length runs it; ``--only "fact varlen"``
(or another case's name) times that case alone.
"""

import json
import random
import sys
import time

import torch

import tensorconv
from tensorconv.nn import factorize

torch.set_num_threads(2)
torch.manual_seed(0)
layers = []
widths = [32, 48, 64, 80, 96, 112, 128]
for c, t in zip(widths, widths[1:]):
    layers += [torch.nn.Conv1d(c, t, 3, padding=1), torch.nn.ReLU()]
dense = torch.nn.Sequential(*layers).eval()
fact = factorize(dense, 0.25, n_iter_max=10).eval()
inputs = [torch.randn(8, 32, n) for n in range(100, 250)]
# distinct batches, as the lengths are (one tensor fed 150 times stays in cache); figures of
# the fixed length measured before 2026-12-07 fed one tensor (--one-tensor) and are lower
fixed = (
    [torch.randn(8, 32, 175) for _ in range(150)]
    if "--one-tensor" not in sys.argv[1:]
    else [torch.randn(8, 32, 175)] * 150
)
entries = {
    "dense varlen": (dense, inputs),
    "fact varlen": (fact, inputs),
    "dense fixed": (dense, fixed),
    "fact fixed": (fact, fixed),
}
if "--fixed-only" in sys.argv[1:]:
    entries = {k: v for k, v in entries.items() if k.endswith("fixed")}
elif "--only" in sys.argv[1:]:  # one case, as a process that runs one model on one stream of inputs
    only = sys.argv[sys.argv.index("--only") + 1]
    entries = {only: entries[only]}
times = {k: [] for k in entries}
with torch.no_grad():
    for _ in range(2):
        for m, xs in entries.values():
            for x in xs:
                m(x)
    order = list(entries)
    for r in range(7):
        random.Random(r).shuffle(order)
        for k in order:
            m, xs = entries[k]
            t0 = time.perf_counter()
            for x in xs:
                m(x)
            times[k].append((time.perf_counter() - t0) / len(xs) * 1e3)
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(tensorconv.__file__, json.dumps({k: round(v, 3) for k, v in med.items()}))
if "fact varlen" in med and "fact fixed" in med:
    print(f"factorized: 150 lengths / one = {med['fact varlen'] / med['fact fixed']:.2f}")
