"""The plane chain's geometry: how it chunks an input, what it allocates, what it costs.

Pure Python (no torch): plans ask these before any array exists.
"""

from __future__ import annotations

__all__ = ["CHUNK_BYTES", "planes_per_chunk", "forward_bytes", "as_3d"]

#: target size of one chunk's widest intermediate (a chunk of input planes goes through one GEMM):
#: small enough that a chunk's buffers stay in a core's cache. A chunk's fixed cost is the
#: barriers of the team of threads, small enough that small chunks need no batching; the size
#: was chosen by timing 128 KiB to 1 MiB chunks (the comparison is in the commit log).
CHUNK_BYTES = 128 << 10


def as_3d(values, fill):
    """Per-mode values of a 1-, 2- or 3-D conv as the kernel's three modes: N = 2 runs
    (mode 0, unit mode, mode 1), so the rows of mode 0 are its planes; N = 1 (mode 0, unit, unit)."""
    values = tuple(values)
    return values if len(values) == 3 else (values[0], fill, values[1] if len(values) == 2 else fill)


def planes_per_chunk(shape, rank, itemsize, chunk_bytes=None, out_channels=None):
    """Input planes per chunk for an input of ``shape`` (B, C, D, H, W) (at least one): as many
    as keep one chunk's widest intermediate within ``chunk_bytes`` (default :data:`CHUNK_BYTES`).
    ``out_channels`` (T) widens the intermediate where it exceeds C and R."""
    _, c, d, h, w = (int(s) for s in shape)
    t = c if out_channels is None else int(out_channels)
    per_plane = h * w * max(rank, c, t) * itemsize
    return max(1, min(d, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // per_plane))


def forward_bytes(shape, rank, itemsize, *, out_channels, out_spatial, kernel0, dilation0, threads):
    """Bytes the kernel's forward allocates for an input of ``shape`` (B, C, D, H, W): the
    channels-last output and each thread's (or the team's) scratch of one chunk of planes
    (``chain_scratch`` in csrc/cp_chain_cpu.cpp: C -> R rows, mode-2 rows, the ring, the output rows)."""
    b, c, d, h, w = (int(v) for v in shape)
    do, ho, wo = (int(v) for v in out_spatial)
    g = planes_per_chunk(shape, rank, itemsize, out_channels=out_channels)
    slots = (kernel0 - 1) * dilation0 + 1 + g - 1
    per_image_threads = threads > 1 and b >= threads
    team = threads > 1 and not per_image_threads
    scratch = rank * (g * h * w + (2 if team else 1) * g * h * wo + slots * ho * wo + ho * wo + threads)
    sets = threads if per_image_threads else 1
    return itemsize * (b * do * ho * wo * out_channels + sets * scratch)
