"""CP decomposition by alternating least squares, in bounded time and memory, on any backend.

Why not tensorly's ``parafac`` by default: for a conv kernel (T, C, K_0, ...) it forms a
Khatri-Rao product and an unfolding per mode and runs one matricised-tensor-times-Khatri-Rao
product (MTTKRP) per mode per iteration, N + 2 products the size of the kernel times R. Here the
kernel is seen as (T, C, S) with S the spatial positions, and each iteration runs two GEMMs of
the kernel's size times R: ``W x_C B`` (T, S, R) serves the T update, ``W x_T A`` (C, S, R)
serves the C update and every spatial one; the rest is (I x R) sized. Besides one permuted copy
of the kernel nothing larger than (max(T, C), S, R) is allocated.

The stopping test uses the fit computed from those products (no reconstruction):
``||W - W_hat||^2 = ||W||^2 - 2 <W, W_hat> + ||W_hat||^2``.
"""

from __future__ import annotations

import math

from ._checks import as_int
from ._typing import Array
from .backends import get_backend

__all__ = ["cp_als", "partial_tucker_hooi"]


def _gram(b, f):
    """f^T f: the (R x R) Gram of a factor's columns."""
    return b.matmul(b.permute(f, (1, 0)), f)


def _row_gram(b, m):
    """m m^T: the Gram of an unfolding's rows, whose leading eigenvectors are its left singular vectors."""
    return b.matmul(m, b.permute(m, (1, 0)))


def _random_like(b, shape, seed, like):
    """Seeded Gaussian values in ``like``'s dtype and device."""
    return b.random_normal(shape, seed=seed, dtype=b.dtype_name(like), device=b.device(like))


def _khatri_rao(b, factors):
    """(prod I_n, R): row (i_0, i_1, ...) in C order of the row-wise Kronecker product."""
    out = factors[0]
    for f in factors[1:]:
        r = int(out.shape[1])
        out = b.reshape(b.einsum("ir,jr->ijr", out, f), (int(out.shape[0]) * int(f.shape[0]), r))
    return out


def _solve(b, gram, rhs):
    """rhs @ inverse(gram) for a symmetric positive semi-definite gram (R x R), ridge-stabilised."""
    r = int(gram.shape[0])
    scale = b.xp.abs(gram).max() if r else 1.0
    reg = gram + 1e-12 * scale * b.eye(r, like=gram)
    return b.permute(b.xp.linalg.solve(reg, b.permute(rhs, (1, 0))), (1, 0))


def _init_factor(b, unfolding_gram, rank, seed, like):
    """Leading eigenvectors of an unfolding's Gram (= left singular vectors); random columns
    where the mode has fewer than ``rank`` dimensions.

    Large Grams go through a randomized subspace iteration (Halko et al. 2011): a full
    eigendecomposition of a 1024 x 1024 Gram cost more than the whole ALS."""
    dim = int(unfolding_gram.shape[0])
    k = min(rank, dim)
    if dim <= 2 * k or dim <= 64:
        _, vecs = b.xp.linalg.eigh(unfolding_gram)
        lead = b.flip(vecs[:, dim - k :], 1)
    else:
        basis = _random_like(b, (dim, k + 10), seed + 7919, like)
        for _ in range(3):  # power iterations sharpen the leading subspace
            basis, _ = b.xp.linalg.qr(b.matmul(unfolding_gram, basis))
        small = b.matmul(b.permute(basis, (1, 0)), b.matmul(unfolding_gram, basis))
        _, vecs = b.xp.linalg.eigh((small + b.permute(small, (1, 0))) / 2)
        lead = b.matmul(basis, b.flip(vecs[:, -k:], 1))
    if k == rank:
        return lead
    return b.concat([lead, _random_like(b, (dim, rank - k), seed, like)], 1)


def cp_als(
    tensor: Array,
    rank: int,
    *,
    n_iter_max: int = 50,
    tol: float = 1e-7,
    init: str = "svd",
    random_state: int = 0,
    return_errors: bool = False,
) -> tuple:
    """CP decomposition of a tensor with 3 or more modes (T, C, *spatial), by ALS.

    Parameters
    ----------
    tensor : array with ndim >= 3 (numpy, torch, cupy or jax)
    rank : int >= 1
    n_iter_max : int
        Iterations at most (each costs two products of the tensor's size times ``rank``).
    tol : float
        Stop when the relative error improves by less than ``tol`` between iterations.
    init : "svd" or "random"
        ``"svd"``: leading left singular vectors of each mode's unfolding (through its Gram
        matrix; random columns beyond a mode's size); ``"random"``: seeded Gaussian factors.
    random_state : int
        Seed of the random parts.
    return_errors : bool
        Also return the relative error after each iteration.

    Returns
    -------
    (weights, factors) or (weights, factors, errors)
        ``weights`` (R,) and one (I_n, R) factor per mode with unit-norm columns.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorconv import KruskalKernel
    >>> k = KruskalKernel.random((8, 6, 3, 3), rank=4, seed=0)
    >>> w, f = cp_als(k.to_dense(), 4, n_iter_max=200, tol=0)
    >>> float(np.linalg.norm(KruskalKernel(w, f).to_dense() - k.to_dense()) / np.linalg.norm(k.to_dense())) < 1e-6
    True
    """
    b = get_backend(tensor)
    if tensor.ndim < 3:
        raise ValueError(f"cp_als needs a tensor with at least 3 modes, got shape {tuple(tensor.shape)}")
    rank = as_int(rank, "rank", minimum=1)
    n_iter_max = as_int(n_iter_max, "n_iter_max", minimum=0)
    _check_tol(tol)
    if init not in ("svd", "random"):
        raise ValueError(f"init={init!r} is not one of ('svd', 'random')")
    shape = tuple(int(s) for s in tensor.shape)
    tensor, scale = _unit_scaled(b, tensor)
    if scale == 0:  # the zero tensor is exactly representable: lambda = 0, unit-norm factors
        factors = [_normalize(b, _random_like(b, (d, rank), random_state + i, tensor))[0] for i, d in enumerate(shape)]
        out = (b.zeros((rank,), like=factors[0]), factors)
        return out + ([0.0],) if return_errors else out
    t, c, spatial = shape[0], shape[1], shape[2:]
    s = math.prod(spatial)
    w3 = b.reshape(b.contiguous(tensor), (t, c, s))
    w_t = b.reshape(w3, (t, c * s))  # rows: T (the GEMM over T below, and T's unfolding)
    norm_sq = float(b.xp.sum(w3 * w3))

    if init == "svd":
        # Grams of the unfoldings: (T x T) and (C x C) from (T, C*S); each spatial mode from its own unfolding
        factors = [_init_factor(b, _row_gram(b, w_t), rank, random_state, tensor)]
        w_c = b.reshape(b.moveaxis(w3, 1, 0), (c, t * s))
        factors.append(_init_factor(b, _row_gram(b, w_c), rank, random_state + 1, tensor))
        full = b.reshape(w3, shape)
        for m, d in enumerate(spatial):
            u = b.reshape(b.moveaxis(full, 2 + m, 0), (d, t * c * s // d))
            factors.append(_init_factor(b, _row_gram(b, u), rank, random_state + 2 + m, tensor))
    else:
        factors = [_random_like(b, (d, rank), random_state + i, tensor) for i, d in enumerate(shape)]
    weights = b.ones((rank,), like=factors[0])
    grams = [_gram(b, f) for f in factors]
    errors = []
    n = len(shape)
    w_tsc = b.contiguous(b.permute(w3, (0, 2, 1)))  # (T, S, C): GEMM over C
    letters = "abcdefgh"[: len(spatial)]
    for _ in range(n_iter_max):
        kr_s = _khatri_rao(b, factors[2:])  # (S, R)
        # T: N[t, s, r] = sum_c W[t, c, s] B[c, r], then the spatial Khatri-Rao
        nn_ = b.reshape(b.matmul(b.reshape(w_tsc, (t * s, c)), factors[1]), (t, s, rank))
        # (broadcast products and sums over s: a batched matmul with batch R here runs far slower)
        factors[0], weights = _normalize(b, _solve(b, _hadamard(b, grams, skip=0), (nn_ * kr_s[None]).sum(1)))
        grams[0] = _gram(b, factors[0])
        # C and every spatial mode: M[c, s, r] = sum_t W[t, c, s] A[t, r]
        m_ = b.reshape(b.matmul(b.permute(w_t, (1, 0)), factors[0]), (c, s, rank))
        factors[1], weights = _normalize(b, _solve(b, _hadamard(b, grams, skip=1), (m_ * kr_s[None]).sum(1)))
        grams[1] = _gram(b, factors[1])
        q = b.reshape((m_ * factors[1][:, None]).sum(0), spatial + (rank,))
        for m in range(len(spatial)):
            others = [factors[2 + j] for j in range(len(spatial)) if j != m]
            if others:
                terms = ",".join(f"{letters[j]}r" for j in range(len(spatial)) if j != m)
                rhs = b.einsum(f"{letters}r,{terms}->{letters[m]}r", q, *others)
            else:
                rhs = q
            factors[2 + m], weights = _normalize(b, _solve(b, _hadamard(b, grams, skip=2 + m), rhs))
            grams[2 + m] = _gram(b, factors[2 + m])
        # the fit from the last update's right-hand side: <W, W_hat> = sum(lambda * F_last * rhs)
        inner = float(b.xp.sum(factors[n - 1] * weights * rhs))
        model_sq = float(b.xp.sum(_hadamard(b, grams, skip=None) * b.einsum("r,q->rq", weights, weights)))
        err = max(norm_sq - 2 * inner + model_sq, 0.0) ** 0.5 / (norm_sq**0.5 if norm_sq else 1.0)
        errors.append(err)
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    out = (weights * scale if scale != 1 else weights, factors)
    return out + (errors,) if return_errors else out


def _unit_scaled(b, tensor):
    """(tensor / s, s) with s the power of two nearest its largest magnitude (0 for a zero tensor),
    so that the solvers' Grams neither overflow nor underflow (float32 near 1e-30 or 1e20, float64
    near 1e-200). A power of two scales exactly: unit-sized tensors are returned as they are."""
    peak = float(b.xp.abs(tensor).max()) if math.prod(tensor.shape) else 0.0
    if peak == 0:
        return tensor, 0.0
    scale = 2.0 ** round(math.log2(peak))
    if 2.0**-16 <= scale <= 2.0**16:
        return tensor, 1.0
    return tensor / scale, scale


def _check_tol(tol):
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol={tol!r}: expected a number >= 0")


def _hadamard(b, grams, skip):
    out = None
    for i, g in enumerate(grams):
        if i == skip:
            continue
        out = g if out is None else out * g
    return out


def _normalize(b, f):
    """Unit-norm columns; the norms become the weights (a zero column keeps norm 1)."""
    norms = b.xp.sqrt(b.xp.sum(f * f, 0))
    safe = b.xp.where(norms > 0, norms, b.ones(tuple(norms.shape), like=norms))
    return f / safe, norms


def partial_tucker_hooi(
    tensor: Array, rank: tuple[int, int], *, n_iter_max: int = 5, tol: float = 1e-7, random_state: int = 0
) -> tuple:
    """Tucker over the channel modes of (T, C, *spatial): ``W ≈ core x_0 U_T x_1 U_C``, by higher-order
    orthogonal iteration from the truncated HOSVD.

    Each factor is the leading eigenvectors of a Gram (C x C or T x T) of the tensor projected on
    the other factor, so nothing larger than the tensor (and one projection of it) is allocated
    and no full SVD of an unfolding is computed.

    Returns
    -------
    (core, [U_T, U_C])
        ``core`` (R_out, R_in, *spatial), orthonormal ``U_T`` (T, R_out) and ``U_C`` (C, R_in).
    """
    b = get_backend(tensor)
    if tensor.ndim < 3:
        raise ValueError(f"partial_tucker_hooi needs a tensor with at least 3 modes, got shape {tuple(tensor.shape)}")
    if len(rank) != 2:
        raise ValueError(f"rank={rank!r}: expected (R_out, R_in)")
    r_out, r_in = (as_int(r, "rank", minimum=1) for r in rank)
    n_iter_max = as_int(n_iter_max, "n_iter_max", minimum=0)
    _check_tol(tol)
    shape = tuple(int(s) for s in tensor.shape)
    tensor, scale = _unit_scaled(b, tensor)
    t, c, spatial = shape[0], shape[1], shape[2:]
    s = math.prod(spatial)
    w3 = b.reshape(b.contiguous(tensor), (t, c, s))
    w_t = b.reshape(w3, (t, c * s))  # rows: T
    w_cts = b.contiguous(b.permute(w3, (1, 0, 2)))  # (C, T, S)
    w_c = b.reshape(w_cts, (c, t * s))  # rows: C

    u_t = _init_factor(b, _row_gram(b, w_t), r_out, random_state, tensor)
    u_c = _init_factor(b, _row_gram(b, w_c), r_in, random_state + 1, tensor)
    norm_sq = float(b.xp.sum(w3 * w3))
    previous = None
    for _ in range(n_iter_max):
        # U_C from W projected on U_T: (R_out, C, S) -> C x (R_out * S)
        proj_t = b.reshape(b.matmul(b.permute(u_t, (1, 0)), w_t), (r_out, c, s))
        m_c = b.reshape(b.moveaxis(proj_t, 1, 0), (c, r_out * s))
        u_c = _init_factor(b, _row_gram(b, m_c), r_in, random_state + 1, tensor)
        # U_T from W projected on U_C: (R_in, T, S) -> T x (R_in * S)
        proj_c = b.reshape(b.matmul(b.permute(u_c, (1, 0)), w_c), (r_in, t, s))
        m_t = b.reshape(b.moveaxis(proj_c, 1, 0), (t, r_in * s))
        u_t = _init_factor(b, _row_gram(b, m_t), r_out, random_state, tensor)
        # ||W - W_hat||^2 = ||W||^2 - ||core||^2 for orthonormal factors
        core = b.matmul(b.permute(u_t, (1, 0)), m_t)  # (R_out, R_in * S)
        err = max(norm_sq - float(b.xp.sum(core * core)), 0.0) ** 0.5 / (norm_sq**0.5 if norm_sq else 1.0)
        if previous is not None and abs(previous - err) < tol:
            break
        previous = err
    if n_iter_max == 0:
        proj_c = b.reshape(b.matmul(b.permute(u_c, (1, 0)), w_c), (r_in, t, s))
        core = b.matmul(b.permute(u_t, (1, 0)), b.reshape(b.moveaxis(proj_c, 1, 0), (t, r_in * s)))
    core = b.reshape(core, (r_out, r_in) + spatial)
    return (core * scale if scale != 1 else core), [u_t, u_c]
