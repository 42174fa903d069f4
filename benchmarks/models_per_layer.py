"""Per-layer forward times of r3d_18, dense against factorize(model, 0.25) (CP), with forward hooks.

Run: ``python benchmarks/models_per_layer.py``. Which layers a whole-network speed-up comes from
(``tensorconv bench models`` times the whole forward); the hooks add a few microseconds per layer.
"""

import time

import torch

from tensorconv.backends import build_cpu_kernel
from tensorconv.cli.bench import _r3d18
from tensorconv.nn import factorize
from tensorconv.nn.layers import _FactorizedConv


def main(repeat=5):
    torch.set_num_threads(2)
    build_cpu_kernel()
    torch.manual_seed(0)
    dense, source = _r3d18()
    dense.eval()
    fact = factorize(dense, 0.25, n_iter_max=1).eval()
    x = torch.randn(1, 3, 16, 112, 112)
    times = {}
    for tag, model in (("dense", dense), ("factorized", fact)):
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.modules.conv._ConvNd, _FactorizedConv)):
                m.register_forward_pre_hook(lambda mod, a: setattr(mod, "_t0", time.perf_counter()))
                m.register_forward_hook(
                    lambda mod, a, o, key=(tag, name): times.setdefault(key, []).append(time.perf_counter() - mod._t0)
                )
    with torch.no_grad():
        for _ in range(repeat):
            dense(x)
            fact(x)
    print(f"{source}, batch 1, 3x16x112x112, medians of {repeat} (ms)")
    total = {"dense": 0.0, "factorized": 0.0}
    for name in sorted({n for _, n in times}):
        row = {tag: 1e3 * sorted(times[(tag, name)])[len(times[(tag, name)]) // 2] for tag in total}
        for tag in total:
            total[tag] += row[tag]
        layer = dict(fact.named_modules())[name]
        print(
            f"{name:24s} dense {row['dense']:8.1f}  factorized {row['factorized']:8.1f}  "
            f"{type(layer).__name__} rank={getattr(layer, 'rank', '-')}"
        )
    print(f"{'all convs':24s} dense {total['dense']:8.1f}  factorized {total['factorized']:8.1f}")


if __name__ == "__main__":
    main()
