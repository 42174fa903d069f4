"""Command-line entry points: ``tensorconv verify``, ``tensorconv bench`` and ``tensorconv build-kernel``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tensorconv", description="Factorized convolutions of any order.")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import verify

    p_verify = sub.add_parser("verify", help="check every derivation of the paper on every backend found")
    verify.add_arguments(p_verify)
    p_bench = sub.add_parser("bench", help="benchmark plans against dense convolution and peers")
    try:
        from . import bench
    except ImportError:  # pragma: no cover
        bench = None
    if bench is not None:
        bench.add_arguments(p_bench)
    sub.add_parser(
        "build-kernel",
        help="build (or load) the registered accelerators' compiled kernels, so that strategy='auto' weighs them",
    )
    args = parser.parse_args(argv)
    if args.command == "build-kernel":
        from .. import accelerators

        built = accelerators.build()
        for name in built:
            print(f"tensorconv: accelerator {name}: {accelerators.get(name).status()}")
        return 0 if all(built.values()) else 1
    if args.command == "verify":
        return verify.main(args)
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
