"""Affect-estimation metrics of the paper (sec. 5): RMSE, SAGR, PCC, CCC, and its loss.

Each metric reduces over the last axis (the samples of one signal) and keeps the others, so a
(2, n) array of valence and arousal gives two values. The same function takes NumPy arrays,
torch tensors (differentiable) or jax arrays: the library is found from the arrays, as
everywhere in tensorconv. All four metrics are symmetric in their two arguments.

Constant signals have no correlation to measure; instead of NaN (0 / 0):

- ``pcc`` is 0 where either signal is constant (no linear association can be seen);
- ``ccc`` is 1 where both signals are the same constant (perfect agreement), and follows
  its formula otherwise (0 where exactly one signal is constant);

and the gradients there are finite (0), so one constant batch does not poison training. Those
are the only values filled in: a NaN in either signal gives NaN (as NumPy and SciPy do), so a
diverged model never scores as a perfect one.
"""

from __future__ import annotations

import math
from typing import Any

from ._typing import Array
from .backends import get_backend

__all__ = ["rmse", "sagr", "pcc", "ccc", "affect_loss"]


def _pair(pred, target):
    b = get_backend(pred, target)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}; "
            f"they must match (nothing is broadcast)"
        )
    if pred.ndim == 0 or int(pred.shape[-1]) == 0:
        raise ValueError(f"pred and target need a non-empty last axis of samples, got shape {tuple(pred.shape)}")
    for name, a in (("pred", pred), ("target", target)):
        if not b.is_floating(a):
            raise TypeError(f"{name} has dtype {b.dtype_name(a)}; the metrics need a floating dtype")
    return b


def _where_positive(b, den, fn, fill):
    """``fn(den)`` where den > 0, ``fill`` where den is 0 (a constant signal), and NaN where den
    is NaN, with finite gradients wherever den is finite (fn is evaluated on 1 where den <= 0,
    so no 0 / 0 or sqrt'(0) enters the backward pass)."""
    xp = b.xp
    ok = den > 0
    value = fn(xp.where(ok, den, b.ones(tuple(den.shape), like=den)))
    filled = b.zeros(tuple(den.shape), like=den) + fill
    # den != den only for NaN: the comparison above is False there, and the fill would hide it
    return xp.where(ok, value, xp.where(den != den, den, filled))


def _moments(b, pred, target):
    mp, mt = pred.mean(-1), target.mean(-1)
    dp, dt = pred - mp[..., None], target - mt[..., None]
    return mp, mt, (dp * dp).mean(-1), (dt * dt).mean(-1), (dp * dt).mean(-1)


def rmse(pred: Array, target: Array) -> Array:
    """Root mean square error ``sqrt(E[(y - y_hat)^2])`` over the last axis.

    Examples
    --------
    >>> import numpy as np
    >>> float(rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])))  # sqrt(4 / 3)
    1.1547005383792515
    """
    b = _pair(pred, target)
    d = pred - target
    mse = (d * d).mean(-1)
    # sqrt'(0) is infinite: a perfect prediction gets gradient 0, not NaN
    return _where_positive(b, mse, b.xp.sqrt, 0.0)


def sagr(pred: Array, target: Array) -> Array:
    """Sign agreement: the fraction of samples where ``sign(y) == sign(y_hat)`` (0 is its own sign).

    Not differentiable (a count); returned in the inputs' dtype.

    Examples
    --------
    >>> import numpy as np
    >>> float(sagr(np.array([0.5, -1.0, 2.0, 0.0]), np.array([1.0, 1.0, 3.0, 0.0])))
    0.75
    """
    b = _pair(pred, target)
    xp = b.xp
    agree = b.astype(xp.sign(pred) == xp.sign(target), b.dtype(pred)).mean(-1)
    # a NaN has no sign: it would count as a disagreement and hide that the signal is broken
    missing = (xp.isnan(pred) | xp.isnan(target)).any(-1)
    return xp.where(missing, agree + math.nan, agree)


def pcc(pred: Array, target: Array) -> Array:
    """Pearson's correlation ``cov(y, y_hat) / (sigma_y sigma_y_hat)`` over the last axis
    (population moments, as the paper's expectations); 0 where either signal is constant.

    Examples
    --------
    >>> import numpy as np
    >>> round(float(pcc(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0]))), 6)
    0.993399
    """
    b = _pair(pred, target)
    _, _, vp, vt, cov = _moments(b, pred, target)
    return _where_positive(b, vp * vt, lambda den: cov / b.xp.sqrt(den), 0.0)


def ccc(pred: Array, target: Array) -> Array:
    """Lin's concordance ``2 cov / (sigma_y^2 + sigma_y_hat^2 + (mu_y - mu_y_hat)^2)`` over the
    last axis (equal to the paper's ``2 sigma sigma PCC / (...)``); 1 where both signals are the
    same constant.

    Examples
    --------
    >>> import numpy as np
    >>> round(float(ccc(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0]))), 6)
    0.322581
    """
    b = _pair(pred, target)
    mp, mt, vp, vt, cov = _moments(b, pred, target)
    return _where_positive(b, vp + vt + (mp - mt) ** 2, lambda den: 2 * cov / den, 1.0)


def _coefficients(b, like, generator, weights):
    if weights is not None:
        values = [float(w) for w in weights] if len(weights) == 3 else []
        if len(values) != 3 or not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
            raise ValueError(
                f"weights={weights!r}: expected three finite non-negative numbers (alpha, beta, gamma) "
                f"with a positive sum"
            )
        return values
    if b.name == "torch":
        import torch

        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator for torch tensors, got {type(generator).__name__}")
        return [float(v) for v in torch.rand(3, generator=generator, dtype=torch.float64)]
    import numpy as np

    if generator is not None and not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")
    rng = generator if generator is not None else np.random.default_rng()
    return [float(v) for v in rng.random(3)]


def affect_loss(
    pred: Array, target: Array, *, generator: Any = None, weights: tuple[float, float, float] | None = None
) -> Array:
    """The paper's regression loss over valence and arousal (sec. 5):

    ``(alpha L_RMSE + beta L_PCC + gamma L_CCC) / (alpha + beta + gamma)`` with
    ``L_RMSE = RMSE_v + RMSE_a``, ``L_PCC = 1 - (PCC_v + PCC_a) / 2`` and
    ``L_CCC = 1 - (CCC_v + CCC_a) / 2``; alpha, beta and gamma are drawn uniformly in [0, 1]
    at every call (shake-shake), so that no term is ignored during training.

    Parameters
    ----------
    pred, target : arrays (N, 2)
        N samples of (valence, arousal); numpy, torch (differentiable) or jax.
    generator : numpy.random.Generator or torch.Generator, optional
        Source of the three coefficients (reproducible runs); a torch.Generator for torch tensors.
    weights : (alpha, beta, gamma), optional
        Fixed coefficients instead of random ones (e.g. ``(1, 1, 1)`` to evaluate).

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([[0.1, -0.2], [0.4, 0.3], [-0.5, 0.6], [0.2, 0.0]])
    >>> float(affect_loss(y, y, weights=(1, 1, 1)))    # perfect: RMSE 0, PCC = CCC = 1
    0.0
    """
    b = _pair(pred, target)
    if pred.ndim != 2 or int(pred.shape[1]) != 2:
        raise ValueError(f"pred and target must have shape (N, 2) (valence, arousal), got {tuple(pred.shape)}")
    p, t = b.moveaxis(pred, 1, 0), b.moveaxis(target, 1, 0)  # (2, N): one signal per row
    l_rmse = rmse(p, t).sum()
    l_pcc = 1 - pcc(p, t).mean()
    l_ccc = 1 - ccc(p, t).mean()
    alpha, beta, gamma = _coefficients(b, pred, generator, weights)
    total = alpha + beta + gamma
    if total <= 0:  # all three drawn as exactly 0: weigh the terms equally
        alpha = beta = gamma = total = 1.0
    return (alpha * l_rmse + beta * l_pcc + gamma * l_ccc) / total
