"""Which form of one CP conv ONNX Runtime runs fastest: r3d_18's `layer1` conv factorized at rank
200 (64 -> 64 channels, 3x3x3, padding 1, input 1x64x16x56x56), exported in four forms of the same
function, each a graph of standard ops (torch.onnx.export, opset 17), timed in ONNX Runtime's CPU
provider with 2 threads; medians of 12 runs after 2, the forms in a shuffled order every round.

- ``per mode``: 1x1x1 Conv, one depthwise Conv per spatial mode, 1x1x1 Conv (what tensorconv
  exports for a layer that runs its steps),
- ``2-D views``: the same steps as 2-D Convs of reshaped tensors (ONNX Runtime's CPU provider
  has blocked-layout kernels for 2-D convs only),
- ``merged depthwise``: 1x1x1 Conv, one 3x3x3 depthwise Conv of the rank-1 kernels, 1x1x1 Conv,
- ``rebuilt dense``: the dense 3x3x3 kernel rebuilt from the factors and one Conv (what tensorconv
  exports where ``auto`` rebuilds),

with the dense kernel of the same weights as the reference.

    python benchmarks/onnx_cp_forms.py
"""

import os
import random
import statistics
import tempfile
import time
import warnings

import onnxruntime as ort
import torch
import torch.nn.functional as F

torch.manual_seed(0)
C, T, R, D, H, W = 64, 64, 200, 16, 56, 56
uc, ut = torch.randn(R, C) / 8, torch.randn(T, R) / 14
u0, u1, u2 = torch.randn(R, 3), torch.randn(R, 3), torch.randn(R, 3)


class PerMode(torch.nn.Module):
    def forward(self, x):
        y = F.conv3d(x, uc[:, :, None, None, None])
        y = F.conv3d(y, u0[:, None, :, None, None], padding=(1, 0, 0), groups=R)
        y = F.conv3d(y, u1[:, None, None, :, None], padding=(0, 1, 0), groups=R)
        y = F.conv3d(y, u2[:, None, None, None, :], padding=(0, 0, 1), groups=R)
        return F.conv3d(y, ut[:, :, None, None, None])


class Views2D(torch.nn.Module):
    def forward(self, x):
        b = x.shape[0]
        y = F.conv2d(x.reshape(b, C, D, H * W), uc[:, :, None, None])
        y = F.conv2d(y, u0[:, None, :, None], padding=(1, 0), groups=R)
        y = y.reshape(b, R * D, H, W)  # modes 1 and 2: one channel per (rank, plane)
        y = F.conv2d(y, u1.repeat_interleave(D, 0)[:, None, :, None], padding=(1, 0), groups=R * D)
        y = F.conv2d(y, u2.repeat_interleave(D, 0)[:, None, None, :], padding=(0, 1), groups=R * D)
        return F.conv2d(y.reshape(b, R, D, H * W), ut[:, :, None, None]).reshape(b, T, D, H, W)


class Merged(torch.nn.Module):
    def forward(self, x):
        k = (u0[:, :, None, None] * u1[:, None, :, None] * u2[:, None, None, :])[:, None]
        y = F.conv3d(F.conv3d(x, uc[:, :, None, None, None]), k, padding=1, groups=R)
        return F.conv3d(y, ut[:, :, None, None, None])


class Rebuilt(torch.nn.Module):
    def forward(self, x):
        return F.conv3d(x, torch.einsum("tr,rc,ra,rb,rd->tcabd", ut, uc, u0, u1, u2), padding=1)


def main():
    warnings.filterwarnings("ignore")
    x = torch.randn(1, C, D, H, W)
    want = Rebuilt()(x)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in [
            ("per mode", PerMode()),
            ("2-D views", Views2D()),
            ("merged depthwise", Merged()),
            ("rebuilt dense", Rebuilt()),
        ]:
            path = os.path.join(tmp, name.replace(" ", "_") + ".onnx")
            torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17)
            sessions[name] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = x.numpy()
    times = {name: [] for name in sessions}
    for r in range(14):
        order = list(sessions)
        random.Random(r).shuffle(order)
        for name in order:
            s = sessions[name]
            t0 = time.perf_counter()
            out = s.run(None, {s.get_inputs()[0].name: feed})[0]
            times[name].append(time.perf_counter() - t0)
            if r == 0:
                err = float(abs(out - want.numpy()).max() / abs(want).max())
                assert err < 1e-4, (name, err)
    for name, t in times.items():
        print(f"{name:<18} {statistics.median(t[2:]) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
