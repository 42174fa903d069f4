"""The plane chain's geometry: what it allocates, how its cost model groups planes.

Pure Python (no torch): plans ask these before any array exists.
"""

from __future__ import annotations

__all__ = ["CHUNK_BYTES", "planes_per_chunk", "forward_bytes", "as_3d"]

#: the cost model's unit of work: planes whose widest intermediate fits in this many bytes count
#: as one chunk (its GEMM rows, its fixed cost). The kernel itself runs plane by plane, row by
#: row; the model's rates were fitted with chunks of this size and are not refitted since.
CHUNK_BYTES = 128 << 10


def as_3d(values, fill):
    """Per-mode values of a 1-, 2- or 3-D conv as the kernel's three modes: N = 2 runs
    (mode 0, unit mode, mode 1), so the rows of mode 0 are its planes; N = 1 (mode 0, unit, unit)."""
    values = tuple(values)
    return values if len(values) == 3 else (values[0], fill, values[1] if len(values) == 2 else fill)


def planes_per_chunk(shape, rank, itemsize, chunk_bytes=None, out_channels=None):
    """Input planes per chunk of the cost model for an input of ``shape`` (B, C, D, H, W) (at
    least one): as many as keep one chunk's widest intermediate within ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`).
    ``out_channels`` (T) widens the intermediate where it exceeds C and R."""
    _, c, d, h, w = (int(s) for s in shape)
    t = c if out_channels is None else int(out_channels)
    per_plane = h * w * max(rank, c, t) * itemsize
    return max(1, min(d, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // per_plane))


def _rows_per_gemm(c, r, w, itemsize):
    """Rows of W input positions per GEMM C -> R call (``fused_block`` in cp_chain_cpu.cpp: about
    24 KiB of rank-R rows, at least 2^18 multiply-adds)."""
    return max(1, (24 << 10) // max(1, w * r * itemsize), (1 << 18) // max(1, w * c * r))


def forward_bytes(shape, rank, itemsize, *, out_channels, out_spatial, kernel, dilation, threads):
    """Bytes the kernel's forward allocates for an input of ``shape`` (B, C, D, H, W): the
    channels-last output and the scratch of each thread running whole images, or of the team
    sharing one (``chain_scratch`` in cp_chain_cpu.cpp: per thread, rows of the GEMM C -> R and a
    ring of mode-2 rows; the ring of mode-1 planes; the mode-0 output rows). ``kernel`` and
    ``dilation``: the kernel's three modes (:func:`as_3d`). Each position's ``rank`` channels
    start a 64-byte register apart in the scratch (``rank_stride``; 32 bytes or none in builds
    without AVX-512, for which this is an upper bound)."""
    b, c, d, h, w = (int(v) for v in shape)
    do, ho, wo = (int(v) for v in out_spatial)
    per_image_threads = threads > 1 and b >= threads
    team = threads if threads > 1 and not per_image_threads else 1
    a_rows = min(h, _rows_per_gemm(c, rank, w, itemsize))
    slots1 = min(h, (kernel[1] - 1) * dilation[1] + a_rows)
    slots = (kernel[0] - 1) * dilation[0] + 1
    lanes = 64 // itemsize
    stride = -(-rank // lanes) * lanes
    rings = team if team > 1 and ho < team else 1  # a team sharing an image by planes: one ring each
    scratch = stride * (team * (a_rows * w + slots1 * wo) + rings * (slots * ho * wo + ho * wo) + threads)
    sets = threads if per_image_threads else 1
    return itemsize * (b * do * ho * wo * out_channels + sets * scratch)
