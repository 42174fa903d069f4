"""The CLI's argument types and output files (shared by its commands)."""

from __future__ import annotations

import argparse


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
