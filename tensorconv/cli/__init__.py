"""Command-line entry points: ``tensorconv verify``, ``tensorconv bench`` and ``tensorconv build-kernel``."""

from __future__ import annotations

import argparse
import sys


def open_output(path, *, flag, directory=False, filename=None):
    """Open the output file for writing now, before the run, so that a bad path costs nothing
    (``os.access`` is not enough: as root it passes for files that no write reaches). ``path``
    is the file, or with ``directory=True`` a folder (made if need be) to hold ``filename``.
    The file is opened for appending, so an existing one is not emptied until
    :func:`write_output` replaces its contents; exits with a message naming ``flag`` otherwise."""
    import os

    target = path
    if directory:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"{flag} {path}: cannot create that folder ({exc.strerror})") from None
        target = os.path.join(path, filename)
    elif os.path.isdir(path):
        raise SystemExit(f"{flag} {path}: is a folder; give a file path")
    try:
        return open(target, "a")
    except OSError as exc:
        raise SystemExit(f"{flag} {path}: cannot write {target} ({exc.strerror})") from None


def write_output(handle, text, *, flag):
    """Replace the contents of a file opened by :func:`open_output` with ``text``."""
    try:
        with handle:
            handle.truncate(0)
            handle.write(text)
    except OSError as exc:
        raise SystemExit(f"{flag} {handle.name}: writing failed ({exc.strerror})") from None


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
