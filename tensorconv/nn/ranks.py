"""Ranks as the layers take them: an int, a fraction of the dense parameters, or "same"."""

from __future__ import annotations

import math
import operator

from .._checks import is_integral
from ..plans.spec import normalize_int_tuple

__all__ = ["cp_rank_for", "tucker_rank_for"]


def _kernel_size(kernel_size, n_spatial):
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        if n_spatial is None:
            raise ValueError(f"kernel_size={kernel_size} is an int: give n_spatial= to say how many spatial dims")
        return normalize_int_tuple(kernel_size, n_spatial, "kernel_size", minimum=1)
    try:
        ks = tuple(kernel_size)
    except TypeError:
        raise TypeError(f"kernel_size must be an int or a tuple of ints, got {kernel_size!r}") from None
    if not ks:
        raise ValueError("kernel_size=() has no spatial mode: a convolution needs at least one")
    if n_spatial is not None and len(ks) != n_spatial:
        raise ValueError(f"kernel_size={ks} has {len(ks)} entries but n_spatial={n_spatial}")
    return normalize_int_tuple(ks, len(ks), "kernel_size", minimum=1)


def cp_rank_for(rank, in_channels, out_channels, kernel_size):
    """Resolve ``rank`` (int, float fraction of the dense parameters, or "same") to an int >= 1."""
    dense = in_channels * out_channels * math.prod(kernel_size)
    per_rank = in_channels + out_channels + sum(kernel_size) + 1
    if isinstance(rank, str):
        if rank != "same":
            raise ValueError(f"rank={rank!r}: expected an int, a float fraction of the dense parameters, or 'same'")
        rank = 1.0
    if isinstance(rank, float):
        if not 0 < rank < math.inf:
            raise ValueError(f"rank={rank} as a fraction of the dense parameter count must be finite and > 0")
        return max(1, int(round(rank * dense / per_rank)))
    if not is_integral(rank) or operator.index(rank) < 1:
        raise ValueError(f"rank must be an int >= 1, a float > 0 or 'same', got {rank!r}")
    return operator.index(rank)


def tucker_rank_for(rank, in_channels, out_channels, kernel_size, groups=1, *, grouped_conv=False):
    """Resolve a Tucker ``rank`` to ``(R_out, R_in)``, both divisible by ``groups``.

    A float is a fraction of the dense parameters and "same" matches them. With
    ``grouped_conv=True`` (block-diagonal factors, a grouped conv's kernel) the budget is the
    grouped conv's ``T C K / groups`` and each group gets ``1 / groups`` of it; otherwise
    (ResNeXt: dense 1x1s around a core grouped ``groups`` ways) the dense conv's ``T C K``.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if grouped_conv and groups > 1:
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}"
            )
        if isinstance(rank, float) or rank == "same":
            r_out, r_in = tucker_rank_for(rank, in_channels // groups, out_channels // groups, kernel_size)
            return r_out * groups, r_in * groups
    if isinstance(rank, str):
        if rank != "same":
            raise ValueError(
                f"rank={rank!r}: expected an int, (R_out, R_in), a float fraction of the dense parameters, or 'same'"
            )
        rank = 1.0
    if isinstance(rank, float):
        if not 0 < rank < math.inf:
            raise ValueError(f"rank={rank} as a fraction of the dense parameter count must be finite and > 0")
        # same fraction of both channel modes: R_out * R_in * K / G + T R_out + C R_in ~ rank * dense
        dense = in_channels * out_channels * math.prod(kernel_size)
        k = math.prod(kernel_size)
        best = (groups, groups)
        widest = max(in_channels, out_channels)
        for s in range(1, widest + 1):
            r_out = groups * max(1, round(s * out_channels / widest / groups))
            r_in = groups * max(1, round(s * in_channels / widest / groups))
            params = r_out * r_in * k // groups + out_channels * r_out + in_channels * r_in
            # largest ranks within the budget, and no larger than the channels they compress
            if params > rank * dense or r_out > out_channels or r_in > in_channels:
                break
            best = (r_out, r_in)
        return best
    rank = (rank, rank) if is_integral(rank) else rank
    try:
        rank = tuple(rank)
    except TypeError:
        raise ValueError(f"rank must be an int, (R_out, R_in), a float or 'same', got {rank!r}") from None
    if len(rank) != 2 or any(not is_integral(r) or operator.index(r) < 1 for r in rank):
        raise ValueError(f"rank must be (R_out, R_in) ints >= 1, got {rank!r}")
    rank = tuple(operator.index(r) for r in rank)
    if rank[0] % groups or rank[1] % groups:
        raise ValueError(f"rank={rank} must be divisible by groups={groups}")
    return rank
