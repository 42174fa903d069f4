"""``KruskalKernel``: a CP kernel, ``[[lambda; U_T, U_C, U_K0, ..]]`` (paper eq. 6)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._checks import as_int
from .._typing import Array
from ..backends import backend_for_name, get_backend
from ._base import (
    _LETTERS,
    _check_finite,
    _check_same_array_kind,
    _FactorizedKernel,
    _half_precision,
    _shape,
    _tensorly_on,
    check_decomposition_keywords,
)


class KruskalKernel(_FactorizedKernel):
    """A CP (Kruskal) convolution kernel ``W = [[weights; factors]]``.

    Parameters
    ----------
    weights : array of shape (R,), or None for all ones
        The lambda vector of the paper (eq. 6); rank selection penalises it.
    factors : list of arrays (or None)
        With the default ``modes``, ``factors[0]`` is (T, R), ``factors[1]`` is (C, R) and
        ``factors[2 + n]`` is (K_n, R). A factor that spans several kernel modes has shape
        (*those dims, R). ``None`` stands for an identity factor (that dimension equals R):
        MobileNet v1 has no input factor, Xception no output factor.
    modes : list of tuples of int, optional
        The kernel modes each factor spans (0 = output channels, 1 = input channels,
        2 + n = spatial mode n). Each mode appears exactly once. ``[(0,), (1,), (2, 3)]``
        is MobileNet's merged KxK factor (paper eq. 5); ``[(0, 2), (1, 3, 4)]`` a (2+1)D conv.

    Examples
    --------
    >>> k = KruskalKernel.random((32, 16, 3, 3, 3), rank=8, seed=0)
    >>> k.shape, k.rank, k.n_params
    ((32, 16, 3, 3, 3), 8, 464)
    >>> k.to_dense().shape
    (32, 16, 3, 3, 3)
    """

    def __init__(self, weights, factors, modes=None):
        factors = list(factors)
        if modes is None:
            modes = [(i,) for i in range(len(factors))]
        modes = [tuple(int(m) for m in (group if isinstance(group, (tuple, list)) else (group,))) for group in modes]
        if len(modes) != len(factors):
            raise ValueError(f"modes has {len(modes)} entries but there are {len(factors)} factors")
        covered = sorted(m for group in modes for m in group)
        n_modes = len(covered)
        if covered != list(range(n_modes)):
            raise ValueError(f"modes={modes} must cover kernel modes 0..{n_modes - 1} exactly once each")
        if n_modes < 3:
            raise ValueError(f"a convolution kernel has at least 3 modes (T, C, K_0); modes={modes} cover {n_modes}")
        arrays = [f for f in factors if f is not None]
        if weights is not None:
            arrays.append(weights)
        if not arrays:
            raise ValueError("at least one factor must be an array (all None would leave the rank unknown)")
        backend = get_backend(*arrays)
        ranks = {int(f.shape[-1]) for f in factors if f is not None}
        if weights is not None:
            if weights.ndim != 1:
                raise ValueError(f"weights must be a vector of shape (R,), got shape {_shape(weights)}")
            ranks.add(int(weights.shape[0]))
        if len(ranks) != 1:
            described = ", ".join(f"factors[{i}]: {_shape(f)}" for i, f in enumerate(factors) if f is not None)
            wdesc = f", weights: {_shape(weights)}" if weights is not None else ""
            raise ValueError(f"the factors disagree on the rank (last dimension): {described}{wdesc}")
        rank = ranks.pop()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        dims = [0] * n_modes
        for i, (f, group) in enumerate(zip(factors, modes)):
            if f is None:
                if len(group) != 1:
                    raise ValueError(f"factors[{i}] is None (identity) but spans several modes {group}")
                dims[group[0]] = rank
                continue
            if f.ndim != len(group) + 1:
                raise ValueError(
                    f"factors[{i}] spans modes {group} so it needs {len(group) + 1} dimensions "
                    f"(*dims, R), got shape {_shape(f)}"
                )
            for m, d in zip(group, f.shape[:-1]):
                if int(d) < 1:
                    raise ValueError(f"factors[{i}] has an empty dimension: shape {_shape(f)}")
                dims[m] = int(d)
        named = [(f"factors[{i}]", f) for i, f in enumerate(factors) if f is not None]
        if weights is not None:
            named.append(("weights", weights))
        _check_same_array_kind(backend, named)
        self.backend = backend
        self.weights = weights if weights is not None else backend.ones((rank,), like=arrays[0])
        self.factors = factors
        self.modes = modes
        self.shape = tuple(dims)
        self.rank = rank

    @classmethod
    def _of_layer(cls, backend, weights, factors, shape, rank):
        """The kernel of a layer, whose parameters keep the shapes it was built with (one factor
        per mode): nothing is checked or read from the arrays, which a tracer would record."""
        kernel = cls.__new__(cls)
        kernel.backend, kernel.weights, kernel.factors = backend, weights, list(factors)
        kernel.modes = [(i,) for i in range(len(kernel.factors))]
        kernel.shape, kernel.rank = tuple(shape), rank
        return kernel

    # -- bookkeeping ---------------------------------------------------------------------------
    def _reference_array(self):
        return self.weights

    @property
    def n_params(self) -> int:
        """Parameters stored: every factor plus the R weights (identity factors are free).

        With one factor per mode this is the paper's R (C + T + sum K_n) + R.
        """
        return sum(math.prod(f.shape) for f in self.factors if f is not None) + self.rank

    @property
    def is_default_modes(self) -> bool:
        return all(group == (i,) for i, group in enumerate(self.modes))

    def _repr_extra(self):
        return "" if self.is_default_modes else f", modes={self.modes}"

    def _map_arrays(self, fn):
        return KruskalKernel(fn(self.weights), [None if f is None else fn(f) for f in self.factors], self.modes)

    # -- dense form -----------------------------------------------------------------------------
    def einsum_operands(self):
        """(equation pieces, operands) of the kernel as one einsum; identity factors included."""
        r = _LETTERS[len(self.shape)]
        terms, operands = [r], [self.weights]
        for f, group in zip(self.factors, self.modes):
            if f is None:
                f = self.backend.eye(self.rank, like=self.weights)
            terms.append("".join(_LETTERS[m] for m in group) + r)
            operands.append(f)
        return terms, operands, _LETTERS[: len(self.shape)]

    def to_dense(self) -> Array:
        """The full (T, C, K_0, ..) kernel, contracted in the order opt_einsum picks."""
        return self._contract()

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        shape: tuple[int, ...],
        rank: int,
        *,
        modes: Sequence[Sequence[int]] | None = None,
        backend: str = "numpy",
        dtype: Any = None,
        device: Any = None,
        seed: int | None = None,
    ) -> KruskalKernel:
        """A kernel with standard-normal factors and weights (reproducible with ``seed``)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 3:
            raise ValueError(f"shape must be (T, C, K_0, ...), got {shape}")
        rank = as_int(rank, "rank", minimum=1)
        b = backend_for_name(backend)
        if modes is None:
            modes = [(i,) for i in range(len(shape))]
        import numpy as np

        seeds = np.random.SeedSequence(seed).generate_state(len(modes) + 1)
        factors = [
            b.random_normal(tuple(shape[m] for m in group) + (rank,), seed=int(s), dtype=dtype, device=device)
            for group, s in zip(modes, seeds[1:])
        ]
        weights = b.random_normal((rank,), seed=int(seeds[0]), dtype=dtype, device=device)
        return cls(weights, factors, modes)

    @staticmethod
    def _own_decomposition():
        """(default method, its solver, the keywords from_dense takes besides the solver's)."""
        from ..decomposition import cp_als

        return "als", cp_als, {"method", "modes"}

    @classmethod
    def from_dense(
        cls, weight: Array, rank: int, *, modes: Sequence[Sequence[int]] | None = None, method: str = "als", **kwargs
    ) -> KruskalKernel:
        """CP-decompose a dense kernel on the weight's own backend, dtype and device.

        ``method="als"`` (default): :func:`tensorconv.decomposition.cp_als`, alternating least
        squares with two kernel-sized products per iteration and memory bounded by about the
        kernel's size (a Conv3d(512, 1024, 3) at rank 256: seconds and a few hundred MB);
        keywords ``n_iter_max=50``, ``tol=1e-7``, ``init="svd"`` (leading singular vectors,
        through a randomized subspace iteration on large modes; random columns beyond a mode's
        size) or ``"random"``, ``random_state=0``. More iterations fit better and cost
        proportionally more.

        ``method="tensorly"``: tensorly's ``parafac`` inside a ``tensorly.backend_context`` (the
        caller's global tensorly backend is left as it was); keywords go to ``parafac`` (default
        ``n_iter_max=200``, ``init="svd"``, or a seeded ``init="random"`` where the rank exceeds
        what its SVD init can give: ``rank > prod(shape) / shape[n]`` for some mode n). It forms
        one Khatri-Rao product per mode and iteration: slow and memory-hungry on large layers.

        Merged ``modes`` are decomposed by reshaping the weight so each group is one mode.
        """
        backend = get_backend(weight)
        if weight.ndim < 3:
            raise ValueError(f"weight must have shape (T, C, K_0, ...), got {_shape(weight)}")
        rank = as_int(rank, "rank", minimum=1)
        check_decomposition_keywords(cls, dict(kwargs, method=method), "KruskalKernel.from_dense")
        half = _half_precision(backend, weight)
        if half:
            return cls.from_dense(backend.astype(weight, "float32"), rank, modes=modes, method=method, **kwargs).astype(
                half
            )
        if method not in ("als", "tensorly"):
            raise ValueError(f"method={method!r} is not one of ('als', 'tensorly')")
        _check_finite(backend, weight, "weight")
        if modes is None:
            modes = [(i,) for i in range(weight.ndim)]
        modes = [tuple(g) for g in modes]
        order = [m for group in modes for m in group]
        if sorted(order) != list(range(weight.ndim)):
            raise ValueError(f"modes={modes} must cover the weight's modes 0..{weight.ndim - 1} exactly once")
        grouped = backend.reshape(
            backend.permute(weight, order),
            tuple(math.prod(weight.shape[m] for m in group) for group in modes),
        )
        if method == "als":
            from ..decomposition import cp_als

            weights, factors = cp_als(grouped, rank, **kwargs)
            return cls._from_grouped(weights, factors, weight, modes, rank)
        dims = [int(d) for d in grouped.shape]
        # tensorly's SVD init takes R leading singular vectors of each mode's unfolding (I_n x prod of the
        # others); where R exceeds that product it fails (an RGB stem at R > 27): such ranks start from a
        # seeded random init instead
        svd_ok = all(rank <= math.prod(dims) // d for d in dims)
        parafac_kwargs = {"init": "svd" if svd_ok else "random", "n_iter_max": 200, "normalize_factors": True}
        if not svd_ok:
            parafac_kwargs["random_state"] = 0
        parafac_kwargs.update(kwargs)
        if parafac_kwargs["init"] == "svd" and not svd_ok:
            worst = min(math.prod(dims) // d for d in dims)
            raise ValueError(
                f"init='svd' needs rank <= {worst} for a weight of shape {_shape(weight)} (each mode's "
                f"unfolding has that many columns), got rank={rank}: use init='random' (the default "
                f"picks it for such ranks) or a smaller rank"
            )
        with _tensorly_on(backend):
            from tensorly.decomposition import parafac

            cp = parafac(grouped, rank, **parafac_kwargs)
        return cls._from_grouped(cp[0], cp[1], weight, modes, rank)

    @classmethod
    def _from_grouped(cls, weights, factors, weight, modes, rank):
        backend = get_backend(weight)
        factors = [
            backend.reshape(f, tuple(int(weight.shape[m]) for m in group) + (rank,)) for f, group in zip(factors, modes)
        ]
        return cls(weights, factors, modes)

    def to_tensorly(self):
        """A ``tensorly.cp_tensor.CPTensor`` (one factor per mode; identity factors made explicit)."""
        if not self.is_default_modes:
            raise ValueError(
                f"to_tensorly needs one factor per mode; this kernel has merged modes {self.modes}. "
                f"Use to_dense() or from_dense(..., modes=None) instead"
            )
        from tensorly.cp_tensor import CPTensor

        factors = [self.backend.eye(self.rank, like=self.weights) if f is None else f for f in self.factors]
        return CPTensor((self.weights, factors))

    @classmethod
    def from_tensorly(cls, cp_tensor):
        """From a ``CPTensor`` or a ``(weights, factors)`` pair of a >= 3-mode tensor."""
        weights, factors = cp_tensor
        return cls(weights, list(factors))

    # -- transduction (paper sec. 4, eq. 8) ------------------------------------------------------
    def transduct(self, kernel_size: int, position: int = 0, init: str = "ones") -> KruskalKernel:
        """Add a spatial mode of size ``kernel_size`` at spatial ``position``.

        ``init="ones"``: the new factor is all ones, as in the paper — the (N+1)-D conv sums
        the N-D conv's outputs over the new window. ``init="center"``: a one-hot at index
        ``(kernel_size - 1) // 2`` — with 'same' padding the (N+1)-D conv equals the N-D conv
        applied frame by frame. The new factor has the dtype and device of the others.
        """
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be an int >= 1, got {kernel_size!r}")
        if not isinstance(position, int) or not 0 <= position <= self.n_spatial:
            raise ValueError(f"position must be an int in [0, {self.n_spatial}], got {position!r}")
        if init not in ("ones", "center"):
            raise ValueError(f"init={init!r} is not one of ('ones', 'center')")
        import numpy as np

        host = np.zeros((kernel_size, self.rank))
        if init == "ones":
            host[:] = 1.0
        else:
            host[(kernel_size - 1) // 2] = 1.0
        new_factor = self.backend.from_numpy(host, like=self.weights)
        new_mode = 2 + position
        modes = [tuple(m + 1 if m >= new_mode else m for m in group) for group in self.modes]
        # keep the factor order aligned with the modes for the default layout
        insert_at = next((i for i, g in enumerate(modes) if min(g) > new_mode), len(modes))
        factors = list(self.factors)
        factors.insert(insert_at, new_factor)
        modes.insert(insert_at, (new_mode,))
        return KruskalKernel(self.weights, factors, modes)
