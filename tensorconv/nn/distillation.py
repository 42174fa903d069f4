"""Recovering accuracy after compression: the dense model as teacher (Hinton et al. 2015)."""

from __future__ import annotations

import math

import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(student, teacher, targets=None, *, temperature: float = 4.0, alpha: float = 0.5, kind="kl"):
    """The loss of a compressed model (``student``'s outputs) taught by the dense one (``teacher``'s).

    ``kind="kl"`` (classification logits, (N, classes)): ``alpha * T^2 * KL(softmax(teacher / T) ||
    softmax(student / T))`` plus ``(1 - alpha) * cross_entropy(student, targets)``; the ``T^2`` keeps
    the soft term's gradients on the scale of the hard one's. ``kind="mse"`` (regression outputs):
    ``alpha * mse(student, teacher) + (1 - alpha) * mse(student, targets)``. Without ``targets``
    only the teacher's term is used (``alpha`` is then 1). The teacher's outputs are detached.

    Examples
    --------
    >>> import torch
    >>> s, t = torch.randn(8, 10), torch.randn(8, 10)
    >>> float(distillation_loss(t, t, alpha=1.0)) < 1e-6     # a student that matches its teacher
    True
    """
    if kind not in ("kl", "mse"):
        raise ValueError(f"kind={kind!r} is not one of ('kl', 'mse')")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature={temperature!r}: expected a number > 0")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r}: expected a number in [0, 1]")
    if student.shape != teacher.shape:
        raise ValueError(f"student outputs {tuple(student.shape)} and teacher outputs {tuple(teacher.shape)} differ")
    teacher = teacher.detach()
    if targets is None:
        alpha = 1.0
    if kind == "kl":
        t = float(temperature)
        soft = F.kl_div(
            F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean", log_target=True
        )
        soft = soft * t * t
        hard = F.cross_entropy(student, targets) if targets is not None else 0.0
    else:
        soft = F.mse_loss(student, teacher)
        hard = F.mse_loss(student, targets) if targets is not None else 0.0
    return alpha * soft + (1 - alpha) * hard
