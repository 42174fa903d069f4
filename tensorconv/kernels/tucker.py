"""``TuckerKernel``: a Tucker kernel (core and factors), grouped or not (paper eq. 4)."""

from __future__ import annotations

import math

from .._checks import as_int, is_integral
from .._typing import Array
from ..backends import backend_for_name, get_backend
from ._base import (
    _LETTERS,
    _blocks_on_diagonal,
    _check_finite,
    _check_same_array_kind,
    _FactorizedKernel,
    _half_precision,
    _shape,
    _tensorly_on,
    check_decomposition_keywords,
)


class TuckerKernel(_FactorizedKernel):
    """A Tucker convolution kernel: ``W = core ×_0 U_T ×_1 U_C ×_2 U_0 ...`` (paper eq. 3-4).

    Parameters
    ----------
    core : array of shape (R_out, R_in // groups, Q_0, ..., Q_{N-1})
        With ``groups > 1`` the full core is block-diagonal in (R_out, R_in): ``groups``
        Tucker blocks summed (ResNeXt). The layout is that of a grouped conv weight.
    factors : list
        ``[U_T, U_C]`` or ``[U_T, U_C, U_0, ..., U_{N-1}]``: U_T (T, R_out), U_C (C, R_in),
        U_n (K_n, Q_n). ``None`` is the identity (then T = R_out, C = R_in or K_n = Q_n).
        With ``groups > 1`` a channel factor may also be block-diagonal, stored by its blocks:
        U_T (T, R_out / groups) and U_C (C, R_in / groups), rows ``j*T/groups ...`` being group
        j's block. With both block-diagonal the kernel is a grouped convolution (every group of
        channels factorized on its own: what ``TuckerConv.from_conv`` makes of a grouped conv);
        with full factors it is ResNeXt's block (dense 1x1s around a grouped core).
    groups : int
    """

    def __init__(self, core, factors, groups=1):
        factors = list(factors)
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        if core.ndim < 3:
            raise ValueError(f"core must have shape (R_out, R_in/groups, Q_0, ...), got {_shape(core)}")
        n_spatial = core.ndim - 2
        if len(factors) == 2:
            factors = factors + [None] * n_spatial
        if len(factors) != 2 + n_spatial:
            raise ValueError(f"a core of shape {_shape(core)} needs 2 or {2 + n_spatial} factors, got {len(factors)}")
        backend = get_backend(core, *factors)
        r_out, r_in_g = int(core.shape[0]), int(core.shape[1])
        r_in = r_in_g * groups
        if r_out % groups:
            raise ValueError(f"core.shape[0]={r_out} (R_out) is not divisible by groups={groups}")
        expected_ranks = [r_out, r_in] + [int(q) for q in core.shape[2:]]
        dims = []
        block = [False, False]
        for i, (f, r) in enumerate(zip(factors, expected_ranks)):
            if f is None:
                dims.append(r)
                continue
            if i < 2 and groups > 1 and f.ndim == 2 and int(f.shape[1]) == r // groups:
                if int(f.shape[0]) % groups:
                    raise ValueError(
                        f"factors[{i}] of shape {_shape(f)} is block-diagonal (R / groups columns) "
                        f"but its {int(f.shape[0])} rows do not split into groups={groups}"
                    )
                block[i] = True
            elif f.ndim != 2 or int(f.shape[1]) != r:
                what = "R_out" if i == 0 else "R_in" if i == 1 else f"Q_{i - 2}"
                also = f" or (dim, {r // groups}) block-diagonal" if i < 2 and groups > 1 else ""
                raise ValueError(
                    f"factors[{i}] must have shape (dim, {r}){also} to match the core's {what} "
                    f"(core shape {_shape(core)}, groups={groups}), got {_shape(f)}"
                )
            dims.append(int(f.shape[0]))
        if min(expected_ranks) < 1:
            raise ValueError(f"every rank must be >= 1, got core shape {_shape(core)}")
        named = [("core", core)] + [(f"factors[{i}]", f) for i, f in enumerate(factors) if f is not None]
        _check_same_array_kind(backend, named)
        self.backend = backend
        self.core = core
        self.factors = factors
        self.groups = groups
        self.shape = tuple(dims)
        #: (U_T, U_C) stored by their diagonal blocks (groups > 1 only)
        self.block_diagonal = tuple(block)

    @classmethod
    def _of_layer(cls, backend, core, factors, groups, shape, block_diagonal):
        """The kernel of a layer, whose parameters keep the shapes it was built with: nothing is
        checked or read from the arrays, which a tracer would record."""
        kernel = cls.__new__(cls)
        kernel.backend, kernel.core, kernel.groups = backend, core, groups
        kernel.factors = list(factors) + [None] * (len(shape) - len(factors))
        kernel.shape, kernel.block_diagonal = tuple(shape), tuple(block_diagonal)
        return kernel

    def _reference_array(self):
        return self.core

    @property
    def is_grouped_conv(self) -> bool:
        """Both channel factors block-diagonal (or identity): the kernel of a grouped conv,
        ``to_grouped_dense()`` is its (T, C / groups, *K) weight."""
        return self.groups > 1 and all(b or f is None for b, f in zip(self.block_diagonal, self.factors[:2]))

    @property
    def dense_params(self) -> int:
        """Parameters of the dense kernel this one factorizes (of the grouped conv if it is one)."""
        return math.prod(self.shape) // (self.groups if self.is_grouped_conv else 1)

    def full_factor(self, i):
        """Channel factor ``i`` (0: U_T, 1: U_C) as a full (dim, R) matrix (blocks on the diagonal)."""
        f = self.factors[i]
        if f is None or not self.block_diagonal[i]:
            return f
        g = self.groups
        return _blocks_on_diagonal(self.backend, self.backend.reshape(f, (g, int(f.shape[0]) // g, int(f.shape[1]))))

    @property
    def rank(self):
        """(R_out, R_in, Q_0, ...): the full (block-diagonal) core's shape."""
        return (int(self.core.shape[0]), int(self.core.shape[1]) * self.groups) + _shape(self.core)[2:]

    @property
    def n_params(self) -> int:
        return math.prod(self.core.shape) + sum(math.prod(f.shape) for f in self.factors if f is not None)

    def _repr_extra(self):
        return f", groups={self.groups}" if self.groups > 1 else ""

    def _map_arrays(self, fn):
        return TuckerKernel(fn(self.core), [None if f is None else fn(f) for f in self.factors], self.groups)

    def einsum_operands(self):
        """The kernel as one einsum over a grouped core: (terms, operands, output letters).

        With both channel factors block-diagonal the output is the grouped conv's weight
        (T, C / groups, *K) (see :meth:`to_grouped_dense`); otherwise the full (T, C, *K)."""
        b = self.backend
        n = self.n_spatial
        g = self.groups
        r_out, r_in = self.rank[:2]
        # letters: g, o, i, q_n for the core; t, s, k_n for the kernel
        L = iter(_LETTERS)
        lg, lo, li = next(L), next(L), next(L)
        lq = [next(L) for _ in range(n)]
        lt, ls = next(L), next(L)
        lk = [next(L) for _ in range(n)]
        core = b.reshape(self.core, (g, r_out // g) + _shape(self.core)[1:])
        terms = [lg + lo + li + "".join(lq)]
        operands = [core]
        if self.is_grouped_conv:  # one Tucker kernel per group: the output's T is (g, T / g)
            # an identity factor is one identity block per group
            u_t, u_c = (
                b.concat([b.eye(r // g, like=self.core)] * g, 0) if f is None else f
                for f, r in zip(self.factors[:2], (r_out, r_in))
            )
            terms += [lg + lt + lo, lg + ls + li]
            operands += [
                b.reshape(u_t, (g, self.shape[0] // g, r_out // g)),
                b.reshape(u_c, (g, self.shape[1] // g, r_in // g)),
            ]
            out = lg + lt + ls
        else:
            u_t, u_c = (
                b.eye(r, like=self.core) if f is None else self.full_factor(i)
                for i, (f, r) in enumerate(zip(self.factors[:2], (r_out, r_in)))
            )
            terms += [lt + lg + lo, ls + lg + li]
            operands += [b.reshape(u_t, (self.shape[0], g, r_out // g)), b.reshape(u_c, (self.shape[1], g, r_in // g))]
            out = lt + ls
        for j, f in enumerate(self.factors[2:]):
            if f is None:
                out += lq[j]
            else:
                terms.append(lk[j] + lq[j])
                operands.append(f)
                out += lk[j]
        return terms, operands, out

    def to_dense(self) -> Array:
        """The full (T, C, *K) kernel (a grouped conv's blocks on the channel diagonal)."""
        if self.is_grouped_conv:
            g = self.groups
            return _blocks_on_diagonal(
                self.backend,
                self.backend.reshape(
                    self.to_grouped_dense(), (g, self.shape[0] // g, self.shape[1] // g) + self.shape[2:]
                ),
            )
        return self._contract()

    def _dense_shaped_as(self, shape):
        # a grouped conv's kernel is also compared with the grouped conv's own (T, C / groups, *K) weight
        if self.is_grouped_conv and shape == (self.shape[0], self.shape[1] // self.groups) + self.shape[2:]:
            return self.to_grouped_dense()
        return super()._dense_shaped_as(shape)

    def to_grouped_dense(self):
        """The weight (T, C / groups, *K) of the grouped conv this kernel factorizes
        (:attr:`is_grouped_conv` kernels only)."""
        if not self.is_grouped_conv:
            raise ValueError(
                "to_grouped_dense needs block-diagonal channel factors (a grouped conv's kernel); "
                "this kernel mixes all channels: use to_dense()"
            )
        w = self._contract()
        return self.backend.reshape(w, (self.shape[0], self.shape[1] // self.groups) + self.shape[2:])

    @classmethod
    def random(
        cls,
        shape,
        rank,
        *,
        groups=1,
        spatial_rank=None,
        backend="numpy",
        dtype=None,
        device=None,
        seed=None,
        grouped_conv=False,
    ):
        """Random Tucker kernel; ``rank=(R_out, R_in)``; ``spatial_rank`` adds spatial factors;
        ``grouped_conv=True`` stores the channel factors block-diagonal (a grouped conv's kernel)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 3:
            raise ValueError(f"shape must be (T, C, K_0, ...), got {shape}")
        rank = tuple(int(r) for r in rank) if not isinstance(rank, int) else (rank, rank)
        if len(rank) != 2 or min(rank) < 1:
            raise ValueError(f"rank must be (R_out, R_in) with entries >= 1, got {rank}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        if rank[0] % groups or rank[1] % groups:
            raise ValueError(f"rank={rank} must be divisible by groups={groups}")
        b = backend_for_name(backend)
        n = len(shape) - 2
        q = (
            list(shape[2:])
            if spatial_rank is None
            else list((spatial_rank,) * n if isinstance(spatial_rank, int) else spatial_rank)
        )
        import numpy as np

        seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(3 + n)]
        core = b.random_normal((rank[0], rank[1] // groups, *q), seed=seeds[0], dtype=dtype, device=device)
        cols = (rank[0] // groups, rank[1] // groups) if grouped_conv else rank
        if grouped_conv and (shape[0] % groups or shape[1] % groups):
            raise ValueError(f"shape={shape}: a grouped conv's channels must be divisible by groups={groups}")
        factors = [
            b.random_normal((shape[0], cols[0]), seed=seeds[1], dtype=dtype, device=device),
            b.random_normal((shape[1], cols[1]), seed=seeds[2], dtype=dtype, device=device),
        ]
        for j in range(n):
            factors.append(
                None
                if spatial_rank is None
                else b.random_normal((shape[2 + j], q[j]), seed=seeds[3 + j], dtype=dtype, device=device)
            )
        return cls(core, factors, groups)

    @staticmethod
    def _own_decomposition():
        """(default method, its solver, the keywords from_dense takes besides the solver's)."""
        from ..decomposition import partial_tucker_hooi

        return "hooi", partial_tucker_hooi, {"method"}

    @classmethod
    def from_dense(cls, weight: Array, rank: int | tuple[int, int], *, method: str = "hooi", **kwargs) -> TuckerKernel:
        """Partial Tucker of a dense kernel over the channel modes, on the weight's backend.

        ``rank=(R_out, R_in)``; the spatial modes stay in the core (the ResNet bottleneck).
        ``method="hooi"`` (default): :func:`tensorconv.decomposition.partial_tucker_hooi`,
        truncated HOSVD then ``n_iter_max=5`` orthogonal iterations through Gram matrices
        (memory about the kernel's size); ``method="tensorly"``: tensorly's ``partial_tucker``
        (keywords passed on).
        """
        if method not in ("hooi", "tensorly"):
            raise ValueError(f"method={method!r} is not one of ('hooi', 'tensorly')")
        backend = get_backend(weight)
        if weight.ndim < 3:
            raise ValueError(f"weight must have shape (T, C, K_0, ...), got {_shape(weight)}")
        rank = (rank, rank) if is_integral(rank) else tuple(rank)
        if len(rank) != 2:
            raise ValueError(f"rank={rank!r}: expected an int or (R_out, R_in)")
        rank = tuple(as_int(r, "rank", minimum=1) for r in rank)
        check_decomposition_keywords(cls, dict(kwargs, method=method), "TuckerKernel.from_dense")
        if rank[0] > weight.shape[0] or rank[1] > weight.shape[1]:
            raise ValueError(f"rank={rank} exceeds the weight's channels {(weight.shape[0], weight.shape[1])}")
        half = _half_precision(backend, weight)
        if half:
            return cls.from_dense(backend.astype(weight, "float32"), rank, method=method, **kwargs).astype(half)
        _check_finite(backend, weight, "weight")
        if method == "hooi":
            from ..decomposition import partial_tucker_hooi

            core, factors = partial_tucker_hooi(weight, rank, **kwargs)
            return cls(core, factors)
        with _tensorly_on(backend):
            from tensorly.decomposition import partial_tucker

            (core, factors), _ = partial_tucker(weight, list(rank), modes=[0, 1], **kwargs)
        return cls(core, list(factors))

    def to_tensorly(self):
        """A ``tensorly.tucker_tensor.TuckerTensor`` (block-diagonal core made explicit)."""
        from tensorly.tucker_tensor import TuckerTensor

        b = self.backend
        full = self.full_core()
        factors = [self.full_factor(0), self.full_factor(1)] + list(self.factors[2:])
        factors = [b.eye(d, like=self.core) if f is None else f for f, d in zip(factors, self.rank)]
        return TuckerTensor((full, factors))

    def full_core(self):
        """The (R_out, R_in, Q..) core with the groups' blocks on the diagonal."""
        if self.groups == 1:
            return self.core
        g = self.groups
        return _blocks_on_diagonal(
            self.backend, self.backend.reshape(self.core, (g, self.rank[0] // g) + _shape(self.core)[1:])
        )

    @classmethod
    def from_tensorly(cls, tucker_tensor):
        core, factors = tucker_tensor
        return cls(core, list(factors))
