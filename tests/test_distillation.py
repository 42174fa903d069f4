"""distillation_loss against the formula written out with NumPy (float64)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tensorconv.nn import distillation_loss  # noqa: E402


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kl_term_and_hard_term_match_the_formula():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    temp, alpha = 3.0, 0.7
    p, q = _softmax(t / temp), _softmax(s / temp)
    kl = (p * (np.log(p) - np.log(q))).sum(-1).mean() * temp**2
    ce = -np.log(_softmax(s)[np.arange(6), y]).mean()
    want = alpha * kl + (1 - alpha) * ce
    got = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature=temp, alpha=alpha)
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_mse_kind_and_the_teacher_gets_no_gradient():
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64)
    loss = distillation_loss(s, t, y, alpha=0.25, kind="mse")
    want = 0.25 * ((s - t) ** 2).mean() + 0.75 * ((s - y) ** 2).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    loss.backward()
    assert t.grad is None and s.grad is not None


def test_bad_arguments_are_named():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="kind="):
        distillation_loss(s, s, kind="l1")
    with pytest.raises(ValueError, match="temperature="):
        distillation_loss(s, s, temperature=0)
    with pytest.raises(ValueError, match="alpha="):
        distillation_loss(s, s, alpha=1.5)
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(s, torch.randn(2, 4))
