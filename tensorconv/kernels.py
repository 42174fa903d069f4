"""Factorized convolution kernels: :class:`KruskalKernel` (CP) and :class:`TuckerKernel`.

A kernel has shape (T, C, K_0, ..., K_{N-1}) — output channels, input channels, then one
kernel size per spatial mode — as the weight of ``torch.nn.ConvNd``. The objects hold
backend arrays (numpy, torch or cupy) and never convert them behind the user's back.
"""

from __future__ import annotations

import contextlib
import math
import string
from collections.abc import Sequence
from typing import Any

from ._checks import as_int, is_integral
from ._typing import Array
from .backends import backend_for_name, get_backend, on_load

__all__ = ["KruskalKernel", "TuckerKernel"]

_TENSORLY_NAMES = {"numpy": "numpy", "torch": "pytorch", "cupy": "cupy", "jax": "jax"}
_LETTERS = string.ascii_letters


def _shape(x):
    return tuple(int(s) for s in x.shape)


@contextlib.contextmanager
def _tensorly_on(backend):
    """tensorly on ``backend`` inside the block only; the caller's global choice is restored."""
    import tensorly

    with tensorly.backend_context(_TENSORLY_NAMES[backend.name]):
        yield tensorly


def _check_same_array_kind(backend, named_arrays):
    """All arrays share one dtype and device; ``named_arrays`` is [(name, array)]."""
    ref_name, ref = named_arrays[0]
    for name, arr in named_arrays[1:]:
        if backend.dtype(arr) != backend.dtype(ref):
            raise TypeError(
                f"{name} has dtype {backend.dtype_name(arr)} but {ref_name} has dtype "
                f"{backend.dtype_name(ref)}; all parts of a kernel must share one dtype"
            )
        if backend.device(arr) != backend.device(ref):
            raise ValueError(
                f"{name} is on device {backend.device(arr)} but {ref_name} is on "
                f"{backend.device(ref)}; all parts of a kernel must be on one device"
            )


def _blocks_on_diagonal(b, blocks):
    """(g, A, B, *rest) blocks -> the (g*A, g*B, *rest) array with block j at rows and columns j."""
    g = int(blocks.shape[0])
    eye = b.eye(g, like=blocks)
    # full[g, a, h, c, ...] = blocks[g, a, c, ...] * eye[g, h]
    full = b.einsum("gac...,gh->gahc...", blocks, eye)
    rows, cols = int(blocks.shape[1]), int(blocks.shape[2])
    return b.reshape(full, (g * rows, g * cols) + _shape(blocks)[3:])


def _check_finite(backend, x, name):
    if backend.is_floating(x) and not backend.all_finite(x):
        raise ValueError(f"{name} contains NaN or infinite values")


class _FactorizedKernel:
    """What Kruskal and Tucker kernels share: shape bookkeeping, backend moves, repr."""

    @property
    def n_spatial(self) -> int:
        return len(self.shape) - 2

    @property
    def kernel_size(self) -> tuple:
        return tuple(self.shape[2:])

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_channels(self) -> int:
        return self.shape[1]

    @property
    def dense_params(self) -> int:
        """Parameters of the dense kernel this one factorizes."""
        return math.prod(self.shape)

    @property
    def dtype(self):
        return self.backend.dtype(self._reference_array())

    @property
    def device(self):
        return self.backend.device(self._reference_array())

    def _map_arrays(self, fn):
        raise NotImplementedError

    def to_backend(self, backend: str, *, dtype: Any = None, device: Any = None):
        """The same kernel on another backend (and optionally dtype / device)."""
        target = backend_for_name(backend)
        source = self.backend

        def move(x):
            host = source.to_numpy(x)
            out = target.from_numpy(host, device=device, dtype=dtype)
            return out

        return self._map_arrays(move)

    def astype(self, dtype):
        return self._map_arrays(lambda x: self.backend.astype(x, dtype))

    def _contract(self):
        """The einsum of :meth:`einsum_operands`, in the order opt_einsum picks, in the kernel's
        own dtype: inside torch.autocast the products it casts (matmul) and those it leaves alone
        (tensordot) would otherwise meet with different dtypes."""
        import opt_einsum

        terms, operands, out = self.einsum_operands()
        with self.backend.autocast_off(self._reference_array()):
            return opt_einsum.contract(",".join(terms) + "->" + out, *operands)

    def relative_error(self, weight: Array) -> float:
        """``||W - to_dense()|| / ||W||`` against a dense kernel ``weight`` of the same shape."""
        b = get_backend(weight, self._reference_array())
        dense = self._dense_shaped_as(_shape(weight))
        if _half_precision(b, weight) or _half_precision(b, dense):  # numpy has no bfloat16 of its own
            weight, dense = b.astype(weight, "float32"), b.astype(dense, "float32")
        diff = b.to_numpy(weight - dense)
        ref = b.to_numpy(weight)
        import numpy as np

        # in float64 and scaled by the largest magnitude: the norms of tiny or huge kernels
        # neither underflow to 0 nor overflow to inf
        diff, ref = diff.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
        peak = max(float(np.abs(diff).max(initial=0)), float(np.abs(ref).max(initial=0)))
        if peak == 0:
            return 0.0
        denom = np.linalg.norm(ref / peak)
        num = np.linalg.norm(diff / peak)
        return float(num / denom) if denom else float(num * peak)

    def _dense_shaped_as(self, shape):
        """The dense kernel to compare with a weight of ``shape``."""
        if shape != self.shape:
            raise ValueError(f"weight has shape {shape}, expected the kernel's shape {self.shape}")
        return self.to_dense()

    def _repr_extra(self):
        return ""

    def __repr__(self):
        return (
            f"{type(self).__name__}(shape={self.shape}, rank={self.rank}{self._repr_extra()}, "
            f"backend={self.backend.name}, dtype={self.backend.dtype_name(self._reference_array())}, "
            f"params={self.n_params} vs dense {self.dense_params})"
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
            from .decomposition import cp_als

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
            from .decomposition import partial_tucker_hooi

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


def check_decomposition_keywords(kernel_class, kwargs: dict, who: str) -> None:
    """A ``TypeError`` naming the valid keywords where ``kwargs`` has one that
    ``kernel_class.from_dense`` would pass to a solver that does not take it (tensorly's own
    solvers, ``method="tensorly"``, check their keywords themselves)."""
    import inspect

    from .decomposition import cp_als, partial_tucker_hooi

    own = {"method"} | ({"modes"} if kernel_class is KruskalKernel else set())
    default, solver = ("als", cp_als) if kernel_class is KruskalKernel else ("hooi", partial_tucker_hooi)
    if kwargs.get("method", default) != default:
        return
    valid = own | set(list(inspect.signature(solver).parameters)[2:]) - {"return_errors"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(
            f"{who}: unknown keyword(s) {', '.join(map(repr, unknown))} for the {kernel_class.__name__} "
            f"decomposition ({solver.__name__}); valid: {', '.join(sorted(valid))}"
        )


def _half_precision(backend, weight):
    """The weight's dtype name where it is float16 / bfloat16, else None: the solvers run in
    float32 there (no half-precision eigh or solve on CPU, and too few digits for ALS to converge),
    and the kernel is stored back in the weight's dtype."""
    name = backend.dtype_name(weight)
    return name if name in ("float16", "bfloat16") else None


def _register_jax_pytrees(_jax_backend):
    """Kernels become JAX pytrees: ``jax.grad`` of a loss wrt a kernel returns a kernel of
    gradients, and kernels pass through ``jax.jit`` / ``jax.vmap`` as arguments.

    Unflattening skips the constructor: JAX rebuilds trees with placeholder leaves (None,
    sentinels) where no array exists, so the static metadata travels as aux data."""
    from jax import tree_util

    from .backends import _backend_of_type

    def own_backend(children, name):
        """The backend of the leaves where they are arrays (a tree_map may change the library),
        else the one the kernel had: JAX unflattens with placeholders (None, sentinels) too."""
        for leaf in tree_util.tree_leaves(children):
            found = _backend_of_type(type(leaf))
            if found is not None:
                return found
        return backend_for_name(name)

    def kruskal_flatten(k):
        return (k.weights, k.factors), (tuple(k.modes), k.shape, k.rank, k.backend.name)

    def kruskal_unflatten(aux, children):
        k = object.__new__(KruskalKernel)
        modes, k.shape, k.rank, name = aux
        k.backend = own_backend(children, name)
        k.weights, factors = children
        k.factors = list(factors)
        k.modes = list(modes)
        return k

    def tucker_flatten(k):
        return (k.core, k.factors), (k.groups, k.shape, k.block_diagonal, k.backend.name)

    def tucker_unflatten(aux, children):
        k = object.__new__(TuckerKernel)
        k.groups, k.shape, k.block_diagonal, name = aux
        k.backend = own_backend(children, name)
        k.core, factors = children
        k.factors = list(factors)
        return k

    tree_util.register_pytree_node(KruskalKernel, kruskal_flatten, kruskal_unflatten)
    tree_util.register_pytree_node(TuckerKernel, tucker_flatten, tucker_unflatten)


on_load("jax", _register_jax_pytrees)
