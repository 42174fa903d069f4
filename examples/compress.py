"""Factorize torchvision's r3d_18 and print the summary (docs/compress.md).

Run: ``python examples/compress.py [--rank 0.25] [--factorization cp]``. Needs torchvision (its
model definitions; see tensorconv/_torchvision.py for the CPU-torch case).
"""

import argparse
import time

import torch

from tensorconv._torchvision import torchvision_models
from tensorconv.nn import factorize, summarize


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=float, default=0.25, help="fraction of each conv's parameters")
    parser.add_argument("--factorization", choices=("cp", "tucker"), default="cp")
    parser.add_argument("--n-iter-max", type=int, default=10, help="decomposition iterations per layer")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision_models().video.r3d_18().eval()  # random weights: no download
    t0 = time.perf_counter()
    small = factorize(model, args.rank, factorization=args.factorization, n_iter_max=args.n_iter_max)
    seconds = time.perf_counter() - t0
    print(summarize(small, (1, 3, 16, 112, 112)))
    print(
        f"\n(factorize: {seconds:.1f} s on {torch.get_num_threads()} threads, n_iter_max={args.n_iter_max}; "
        f"random weights, so the errors say how far a random kernel is from this rank)"
    )


if __name__ == "__main__":
    main()
