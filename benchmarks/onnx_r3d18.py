"""r3d_18 (torchvision's definition) in ONNX Runtime, CPU provider, 2 threads, batch 1, input
3x16x112x112: the dense model against ``factorize(model, 0.25)`` and, where the imported
tensorconv has it, ``fold_batchnorm`` of that; each exported by ``torch.onnx.export(dynamo=True)``.
Prints the node counts of the graphs, the factorized graphs' error against eager torch, and the
medians of 7 runs in a shuffled order after one warm-up. Times whichever tensorconv is imported,
so two checkouts compare in one sitting:

    PYTHONPATH=/path/to/checkout python benchmarks/onnx_r3d18.py
"""

import random
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tensorconv._torchvision import torchvision_models
from tensorconv.nn import factorize

try:
    from tensorconv.nn import fold_batchnorm
except ImportError:  # an older checkout
    fold_batchnorm = None

warnings.simplefilter("ignore")
torch.set_num_threads(2)
tv = torchvision_models()
torch.manual_seed(0)
dense = tv.video.r3d_18().eval()
fact = factorize(dense, 0.25).eval()
models = {"dense": dense, "factorized": fact}
if fold_batchnorm is not None:
    models["factorized+fold"] = fold_batchnorm(fact)
x = torch.randn(1, 3, 16, 112, 112)
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
opts.inter_op_num_threads = 1
sessions = {}
for name, m in models.items():
    path = f"/tmp/tensorconv-r3d18-{name}.onnx"
    torch.onnx.export(m, (x,), dynamo=True, verbose=False).save(path)
    counts = {}
    for node in onnx.load(path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    print(name, {k: v for k, v in counts.items() if k in ("Conv", "ConvTranspose", "BatchNormalization")})
    sessions[name] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
feed = x.numpy()
with torch.no_grad():
    want = fact(x).numpy()
for name, s in sessions.items():
    if name != "dense":
        got = s.run(None, {s.get_inputs()[0].name: feed})[0]
        print(name, "max error / max |eager|:", float(np.abs(got - want).max() / np.abs(want).max()))
times = {k: [] for k in sessions}
for s in sessions.values():
    s.run(None, {s.get_inputs()[0].name: feed})
order = list(sessions)
for r in range(7):
    random.Random(r).shuffle(order)
    for k in order:
        s = sessions[k]
        t0 = time.perf_counter()
        s.run(None, {s.get_inputs()[0].name: feed})
        times[k].append(time.perf_counter() - t0)
med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
print({k: round(v, 1) for k, v in med.items()})
for k in med:
    if k != "dense":
        print(f"dense / {k} = {med['dense'] / med[k]:.2f}")
