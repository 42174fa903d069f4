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
    sub.add_parser("build-kernel", help="build the compiled CPU kernel of strategy='fused' (torch, CP kernels), "
                                        "so that strategy='auto' uses it")
    args = parser.parse_args(argv)
    if args.command == "build-kernel":
        from ..backends import _torch_cpu_chain, build_cpu_kernel

        ok = build_cpu_kernel()
        why = "TENSORCONV_NO_CPU_KERNEL is set" if _torch_cpu_chain.disabled() else "see the warning above"
        print("tensorconv: the CPU kernel is " + ("ready" if ok else f"not available here ({why})"))
        return 0 if ok else 1
    if args.command == "verify":
        return verify.main(args)
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
