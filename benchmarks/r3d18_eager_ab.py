"""r3d_18 dense against ``factorize(model, 0.25)`` in eager torch, as ``tensorconv bench models``
times it (random weights, eval, no gradients, a plain process), for whichever tensorconv is
imported, so that two checkouts compare in one sitting (the plane chain's library is built per
source, so each checkout runs its own):

    PYTHONPATH=/path/to/before python benchmarks/r3d18_eager_ab.py [BATCH]
    PYTHONPATH=/path/to/after  python benchmarks/r3d18_eager_ab.py [BATCH]

Prints the medians of 7 interleaved runs after 2 (ms) and dense / factorized.
"""

import json
import sys

import torch

import tensorconv
from tensorconv._torchvision import torchvision_models
from tensorconv.bench.timing import measure_many
from tensorconv.nn import factorize

torch.set_num_threads(2)
torch.manual_seed(0)
batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
dense = torchvision_models().video.r3d_18().eval()
fact = factorize(dense, 0.25).eval()
x = torch.randn(batch, 3, 16, 112, 112)


def forward(model):
    def run():
        with torch.no_grad():
            model(x)

    return run


t = measure_many({"dense": forward(dense), "factorized": forward(fact)}, warmup=2, repeat=7)
med = {k: round(v["median_ms"], 1) for k, v in t.items()}
print(tensorconv.__file__, json.dumps(med), f"dense / factorized = {med['dense'] / med['factorized']:.2f}")
