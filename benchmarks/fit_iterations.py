"""How many ALS iterations a CP fit needs: relative error and time against ``n_iter_max``.

For a few kernels (two convs of the digits CNN of ``examples/compress_to_target.py``, trained here
as there, and one conv of torchvision's r3d_18 with its random initial weights), each at a
quarter of its parameters, ``KruskalKernel.from_dense`` is run with n_iter_max in ITERATIONS
(each from scratch, the default init and tol) and timed. The default (``n_iter_max=50``) is
where the curve should flatten.

    python benchmarks/fit_iterations.py --out results/fit-iterations.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch

from tensorconv import KruskalKernel
from tensorconv.nn import cp_rank_for

ITERATIONS = (5, 10, 20, 50, 100, 200)


def _example():
    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "compress_to_target.py"
    )
    spec = importlib.util.spec_from_file_location("compress_to_target", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernels():
    example = _example()
    torch.manual_seed(0)
    train_data, _ = example.load_digits(0)
    cnn = example.train(example.make_model(), train_data, 600, 2e-3, 0)
    yield "digits CNN conv 32->64 3x3 (trained)", cnn[2].weight.detach().double()
    yield "digits CNN conv 64->128 3x3 (trained)", cnn[5].weight.detach().double()
    from tensorconv._torchvision import torchvision_models

    r3d = torchvision_models().video.r3d_18()
    yield "r3d_18 layer2.0.conv2 128->128 3x3x3 (random init)", r3d.layer2[0].conv2[0].weight.detach().double()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name, w in kernels():
        rank = cp_rank_for(0.25, w.shape[1], w.shape[0], tuple(w.shape[2:]))
        for n_iter in ITERATIONS:
            t0 = time.perf_counter()
            k = KruskalKernel.from_dense(w, rank, n_iter_max=n_iter)
            seconds = time.perf_counter() - t0
            error = float(k.relative_error(w))
            rows.append({"kernel": name, "rank": rank, "n_iter_max": n_iter, "error": error, "seconds": seconds})
            print(f"{name}: rank {rank}, n_iter_max {n_iter:4d}: error {error:.4f} in {seconds:.2f} s", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
