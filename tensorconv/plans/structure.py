"""A kernel's structure as an einsum network: which weight operands carry which indices.

Index names: ``t`` output channels, ``s`` input channels, ``k<n>`` the taps of spatial mode
n, ``r`` the CP rank, ``g`` groups, ``o`` / ``i`` Tucker ranks, ``q<n>`` Tucker spatial ranks.
The activation carries ``act_in`` channel indices (C split into them) and, virtually, every
tap index; the output carries ``act_out`` (T split into them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..kernels import KruskalKernel, TuckerKernel

__all__ = ["KernelStructure", "Operand", "structure_of", "weight_arrays", "dense_structure"]


@dataclass(frozen=True)
class Operand:
    name: str
    indices: tuple
    shape: tuple


@dataclass(frozen=True, eq=False)
class KernelStructure:
    kind: str  # "dense", "kruskal" or "tucker"
    shape: tuple  # the equivalent dense kernel (T, C, K..) (C/groups for a grouped dense kernel)
    groups: int
    operands: tuple
    act_in: tuple
    act_out: tuple
    sizes: tuple  # ((index, size), ...)
    key: tuple  # hashable identity of the structure
    #: CP kernels: the modes of each factor, e.g. ((0,), (1,), (2,), (3,)), and which factors
    #: are the identity (None); empty for other kinds
    factor_modes: tuple = ()
    identity_factors: tuple = ()

    # the key is the structure's identity: hashing and comparing it alone (conv() hashes a
    # structure on every call) is cheaper than every field's nested tuples
    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, KernelStructure) and self.key == other.key

    @property
    def size_of(self):
        return dict(self.sizes)

    def index_sizes(self, kernel_size):
        """Every index of the steps -> its size: the structure's, and each tap by ``kernel_size``."""
        sizes = dict(self.sizes)
        sizes.update(zip(self.taps, kernel_size))
        return sizes

    @property
    def n_spatial(self):
        return len(self.shape) - 2

    @property
    def taps(self):
        return tuple(f"k{n}" for n in range(self.n_spatial))

    @property
    def in_channels(self):
        return self.shape[1] * (self.groups if self.kind == "dense" else 1)

    @property
    def out_channels(self):
        return self.shape[0]


def _tap(n):
    return f"k{n}"


def _collect_sizes(operands, act_in_sizes):
    sizes = dict(act_in_sizes)
    for op in operands:
        for index, size in zip(op.indices, op.shape):
            if sizes.setdefault(index, size) != size:
                raise ValueError(f"index {index!r} has inconsistent sizes {sizes[index]} and {size}")
    return tuple(sorted(sizes.items()))


def dense_structure(shape, groups=1):
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise ValueError(f"a dense kernel has shape (T, C/groups, K_0, ...), got {shape}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    t = shape[0]
    if t % groups:
        raise ValueError(f"out_channels={t} (kernel shape {shape}) is not divisible by groups={groups}")
    taps = tuple(_tap(n) for n in range(len(shape) - 2))
    if groups == 1:
        op = Operand("W", ("t", "s") + taps, shape)
        act_in, act_out, extra = ("s",), ("t",), {}
    else:
        op = Operand("W", ("g", "t", "s") + taps, (groups, t // groups) + shape[1:])
        act_in, act_out, extra = ("g", "s"), ("g", "t"), {"g": groups}
    sizes = _collect_sizes([op], extra)
    return KernelStructure("dense", shape, groups, (op,), act_in, act_out, sizes, ("dense", shape, groups))


def _kruskal_structure(kernel: KruskalKernel):
    # built once per (shape, rank, modes, identity factors): conv() asks for it on every call
    return _kruskal_structure_of(
        tuple(kernel.shape),
        int(kernel.rank),
        tuple(tuple(g) for g in kernel.modes),
        tuple(f is None for f in kernel.factors),
    )


@functools.lru_cache(maxsize=256)
def _kruskal_structure_of(kshape, rank, modes, none_mask):
    names = {0: "t", 1: "s"}
    names.update({2 + n: _tap(n) for n in range(len(kshape) - 2)})
    for is_none, group in zip(none_mask, modes):
        if is_none and group[0] in (0, 1):
            names[group[0]] = "r"  # an identity channel factor: the channel index IS the rank index
    operands = [Operand("lambda", ("r",), (rank,))]
    for is_none, group in zip(none_mask, modes):
        if is_none and group[0] in (0, 1):
            continue
        label = "U_" + "".join({0: "T", 1: "C"}.get(m, f"K{m - 2}") for m in group)
        shape = tuple(kshape[m] for m in group) + (rank,)
        operands.append(Operand(label, tuple(names[m] for m in group) + ("r",), shape))
    sizes = _collect_sizes(operands, {})
    key = ("kruskal", kshape, rank, modes, none_mask)
    return KernelStructure(
        "kruskal", kshape, 1, tuple(operands), (names[1],), (names[0],), sizes, key, modes, none_mask
    )


def _tucker_structure(kernel: TuckerKernel):
    g = kernel.groups
    r_out, r_in = kernel.rank[:2]
    grouped = g > 1
    gi = ("g",) if grouped else ()
    gs = (g,) if grouped else ()
    core_spatial = []
    operands = []
    for j, f in enumerate(kernel.factors[2:]):
        if f is None:
            core_spatial.append(_tap(j))
        else:
            core_spatial.append(f"q{j}")
    core_shape = gs + (r_out // g, r_in // g) + tuple(int(q) for q in kernel.core.shape[2:])
    operands.append(Operand("core", gi + ("o", "i") + tuple(core_spatial), core_shape))
    block_t, block_c = kernel.block_diagonal
    act_sizes = {}
    if block_t:  # stored by its diagonal blocks: output channels (g, T / g)
        operands.append(Operand("U_T", ("g", "t", "o"), (g, kernel.shape[0] // g, r_out // g)))
        act_out = ("g", "t")
    elif kernel.factors[0] is not None:
        operands.append(Operand("U_T", ("t",) + gi + ("o",), (kernel.shape[0],) + gs + (r_out // g,)))
        act_out = ("t",)
    else:
        act_out = gi + ("o",)
    if block_c:  # input channels (g, C / g), each group's block applied to its own channels
        operands.append(Operand("U_C", ("g", "s", "i"), (g, kernel.shape[1] // g, r_in // g)))
        act_in = ("g", "s")
        act_sizes = {"g": g}
    elif kernel.factors[1] is not None:
        operands.append(Operand("U_C", ("s",) + gi + ("i",), (kernel.shape[1],) + gs + (r_in // g,)))
        act_in = ("s",)
    else:
        act_in = gi + ("i",)
        act_sizes = {"g": g} if grouped else {}
    for j, f in enumerate(kernel.factors[2:]):
        if f is not None:
            operands.append(Operand(f"U_K{j}", (_tap(j), f"q{j}"), tuple(int(d) for d in f.shape)))
    sizes = _collect_sizes(operands, act_sizes)
    key = ("tucker", kernel.shape, kernel.rank, g, tuple(f is None for f in kernel.factors), kernel.block_diagonal)
    return KernelStructure("tucker", kernel.shape, 1, tuple(operands), act_in, act_out, sizes, key)


def structure_of(kernel, groups=1):
    """The structure of a KruskalKernel, a TuckerKernel, or a dense kernel (array or shape)."""
    if isinstance(kernel, KruskalKernel):
        if groups != 1:
            raise ValueError(f"groups={groups} applies to dense kernels only; a KruskalKernel has no groups")
        return _kruskal_structure(kernel)
    if isinstance(kernel, TuckerKernel):
        if groups != 1:
            raise ValueError(f"groups={groups} applies to dense kernels only; give the TuckerKernel groups= instead")
        return _tucker_structure(kernel)
    if isinstance(kernel, KernelStructure):
        return kernel
    if isinstance(kernel, tuple):
        return dense_structure(kernel, groups)
    if hasattr(kernel, "shape") and hasattr(kernel, "ndim"):
        return dense_structure(tuple(kernel.shape), groups)
    raise TypeError(
        f"kernel must be a dense array, a KruskalKernel, a TuckerKernel or a shape tuple, got {type(kernel).__name__}"
    )


def weight_arrays(kernel, structure, backend):
    """The kernel's arrays in the order of ``structure.operands`` (reshaped for groups)."""
    if structure.kind == "dense":
        w = kernel
        op = structure.operands[0]
        return [backend.reshape(w, op.shape) if structure.groups > 1 else w]
    if structure.kind == "kruskal":
        out = [kernel.weights]
        for f, group in zip(kernel.factors, kernel.modes):
            if f is None:
                if group[0] in (0, 1):
                    continue
                f = backend.eye(kernel.rank, like=kernel.weights)
            out.append(f)
        return out
    # tucker: the operands were listed as core, U_T?, U_C?, spatial factors
    it = iter(structure.operands)
    out = []
    for op in it:
        if op.name == "core":
            out.append(backend.reshape(kernel.core, op.shape))
        elif op.name == "U_T":
            out.append(backend.reshape(kernel.factors[0], op.shape))
        elif op.name == "U_C":
            out.append(backend.reshape(kernel.factors[1], op.shape))
        else:
            out.append(kernel.factors[2 + int(op.name[3:])])
    return out
