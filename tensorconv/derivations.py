"""The paper's derivations as a registry: each block form, its kernel form and a random instance
(``tensorconv verify`` and the property tests run every entry on every backend)."""

from __future__ import annotations

from dataclasses import dataclass

from .architectures import (
    ConvLayer,
    _merged_modes,
    block_to_kruskal,
    block_to_tucker,
    kernel_to_mobilenet_v1,
    kernel_to_mobilenet_v2,
    kernel_to_r2plus1d,
    kernel_to_xception,
    kruskal_to_block,
    mobilenet_v1_to_kernel,
    mobilenet_v2_to_kernel,
    r2plus1d_to_kernel,
    tucker_to_block,
    xception_to_kernel,
)
from .backends import backend_for_name
from .kernels import KruskalKernel, TuckerKernel

__all__ = ["Derivation", "DERIVATIONS", "PAPER_NAMES", "derivation_label"]


@dataclass
class Derivation:
    name: str
    title: str
    make_kernel: object  # (rng, n, backend, dtype, device) -> kernel
    to_block: object  # (kernel, **geometry) -> layers
    to_kernel: object  # layers -> kernel
    dims: tuple = (1, 2, 3)
    needs_n: int | None = None


def _rand(backend, shape, rng, dtype, device):
    b = backend_for_name(backend)
    return b.random_normal(shape, seed=int(rng.integers(2**31)), dtype=dtype, device=device)


def _kruskal(rng, n, backend, dtype, device):
    c, t, r = (int(v) for v in rng.integers(1, 6, size=3))
    ks = tuple(int(k) for k in rng.integers(1, 4, size=n))
    return KruskalKernel.random(
        (t, c) + ks, r, backend=backend, dtype=dtype, device=device, seed=int(rng.integers(2**31))
    )


def _tucker(groups):
    def make(rng, n, backend, dtype, device):
        c, t = (int(v) for v in rng.integers(1, 6, size=2))
        ks = tuple(int(k) for k in rng.integers(1, 4, size=n))
        rank = (groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3)))
        return TuckerKernel.random(
            (t, c) + ks, rank, groups=groups, backend=backend, dtype=dtype, device=device, seed=int(rng.integers(2**31))
        )

    return make


def _merged(out_factor, in_factor):
    def make(rng, n, backend, dtype, device):
        r = int(rng.integers(1, 6))
        t = int(rng.integers(1, 6))
        c = int(rng.integers(1, 6))
        ks = tuple(int(k) for k in rng.integers(1, 4, size=n))
        factors = [
            _rand(backend, (t, r), rng, dtype, device) if out_factor else None,
            _rand(backend, (c, r), rng, dtype, device) if in_factor else None,
            _rand(backend, ks + (r,), rng, dtype, device),
        ]
        weights = _rand(backend, (r,), rng, dtype, device)
        return KruskalKernel(weights, factors, modes=_merged_modes(n))

    return make


def _r2plus1d(rng, n, backend, dtype, device):
    m, c, t = (int(v) for v in rng.integers(1, 6, size=3))
    ks = tuple(int(k) for k in rng.integers(1, 4, size=n))
    a = _rand(backend, (t, ks[0], m), rng, dtype, device)
    s = _rand(backend, (c,) + ks[1:] + (m,), rng, dtype, device)
    return KruskalKernel(
        _rand(backend, (m,), rng, dtype, device), [a, s], modes=[(0, 2), (1,) + tuple(range(3, 2 + n))]
    )


def _pointwise(rng, n, backend, dtype, device):
    c, t = (int(v) for v in rng.integers(1, 6, size=2))
    return _rand(backend, (t, c) + (1,) * n, rng, dtype, device)


DERIVATIONS = {
    "pointwise": Derivation(
        "pointwise",
        "1x1 conv == mode-1 product (3.1)",
        _pointwise,
        lambda w, **g: [ConvLayer(w)],
        lambda layers: layers[0].weight,
        (1, 2, 3, 4),
    ),
    "cp": Derivation(
        "cp",
        "CP conv == 1x1 -> depthwise 1-D per mode -> 1x1 (fig. 2, eq. 6)",
        _kruskal,
        kruskal_to_block,
        block_to_kruskal,
        (1, 2, 3, 4),
    ),
    "tucker": Derivation(
        "tucker",
        "Tucker conv == ResNet bottleneck (eq. 4, fig. 3)",
        _tucker(1),
        tucker_to_block,
        block_to_tucker,
        (1, 2, 3, 4),
    ),
    "mobilenet_v1": Derivation(
        "mobilenet_v1",
        "MobileNet v1 == CP, R=C, identity U_C, merged U_S (fig. 4)",
        _merged(True, False),
        kernel_to_mobilenet_v1,
        lambda layers: mobilenet_v1_to_kernel(layers[0].weight, layers[1].weight),
        (1, 2, 3),
    ),
    "mobilenet_v2": Derivation(
        "mobilenet_v2",
        "MobileNet v2 (linear) == CP with merged U_S (eq. 5, fig. 5)",
        _merged(True, True),
        kernel_to_mobilenet_v2,
        lambda layers: mobilenet_v2_to_kernel(*[lay.weight for lay in layers]),
        (1, 2, 3),
    ),
    "resnext": Derivation(
        "resnext",
        "ResNeXt == Tucker with block-diagonal core (3.4)",
        _tucker(2),
        tucker_to_block,
        block_to_tucker,
        (1, 2, 3),
    ),
    "xception": Derivation(
        "xception",
        "Xception == CP with identity U_T, merged U_S (3.4)",
        _merged(False, True),
        kernel_to_xception,
        lambda layers: xception_to_kernel(*[lay.weight for lay in layers]),
        (1, 2, 3),
    ),
    "r2plus1d": Derivation(
        "r2plus1d",
        "(2+1)D == CP of rank M over {T,K_t}, {C,K,K}",
        _r2plus1d,
        kernel_to_r2plus1d,
        lambda layers: r2plus1d_to_kernel(layers[0].weight, layers[1].weight),
        (2, 3),
    ),
}

#: the names the paper (and its readers) use for the derivations -> their key in DERIVATIONS;
#: ``tensorconv verify --derivation`` takes either, and its table shows both
PAPER_NAMES = {
    "1x1": "pointwise",
    "kruskal": "cp",
    "bottleneck": "tucker",
    "resnet_bottleneck": "tucker",
    "2plus1d": "r2plus1d",
    "(2+1)d": "r2plus1d",
}


def derivation_label(name):
    """``"tucker/bottleneck"``: the key and the paper's short name, where they differ."""
    alias = next((a for a, key in PAPER_NAMES.items() if key == name), None)
    return f"{name}/{alias}" if alias else name
