"""Command-line entry points: ``tensorconv verify``, ``tensorconv bench`` and ``tensorconv build-kernel``."""

from __future__ import annotations

import argparse
import sys


def check_writable(path, *, directory=False, flag):
    """Exit with a message now (not after the run) if ``path`` cannot be written: a file whose
    folder exists and is writable, or a folder that exists writable or can be made."""
    import os

    target = os.path.abspath(path)
    if directory:
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"{flag} {path}: cannot create that folder ({exc.strerror})") from None
        if not os.access(target, os.W_OK | os.X_OK):
            raise SystemExit(f"{flag} {path}: that folder is not writable")
        return
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise SystemExit(f"{flag} {path}: is a folder; give a file path")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag} {path}: folder {parent} does not exist or is not writable")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise SystemExit(f"{flag} {path}: the file exists and is not writable")


def non_negative_int(text):
    """argparse type: an int >= 0 (a seed)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
    return value


def positive_int(text):
    """argparse type: an int >= 1 (a batch size, a repeat count)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def enable_jax_x64():
    """Turn on JAX's 64-bit mode for this command (the library never changes jax's config:
    the CLI is the application here). Without it jax would run float64 cases in float32."""
    import jax

    jax.config.update("jax_enable_x64", True)


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
