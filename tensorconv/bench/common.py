"""What several suites share: targets, inputs, matched ranks, the r3d_18 definition."""

from __future__ import annotations

import numpy as np

from ..backends import available_backends, backend_for_name


def _array_device(device):
    """The device argument for creating arrays ("cupy" is a backend, not a device name)."""
    return None if device in (None, "cupy") else device


def _targets(args):
    out = []
    for name in args.backend or available_backends():
        if name == "torch-cuda":
            out.append(("torch", "cuda"))
        elif name == "cupy":
            out.append(("cupy", "cupy"))
        else:
            out.append((name, "cpu" if name == "torch" else None))
    return out


def _make_input(backend, device, shape, dtype="float32", requires_grad=False):
    b = backend_for_name(backend)
    x = b.random_normal(shape, seed=0, dtype=dtype, device=_array_device(device))
    if requires_grad:
        x.requires_grad_(True)
    return x


def params_matched_rank(c, t, ks):
    return max(1, (c * t * int(np.prod(ks))) // (c + t + sum(ks) + 1))


def _label(backend, device):
    return "torch-cuda" if device == "cuda" else backend


def _jax_jitted(fn, *args):
    """``fn`` compiled by jax.jit, as a no-argument callable: jax users jit their step, and the
    compile happens in the benchmark's warm-up runs, outside the timing."""
    import jax

    jitted = jax.jit(fn)
    return lambda: jitted(*args)


def import_tltorch():
    """tensorly-torch if installed. Importing it calls ``tensorly.set_backend("pytorch")`` for the
    whole process (a known trap); the caller's backend is put back at once, and the peers suite
    runs inside ``tensorly.backend_context("pytorch")`` instead (tensorconv does not read
    tensorly's global backend; a context per call would add its own cost to every timed call)."""
    try:
        import tensorly
    except ImportError:
        return None
    before = tensorly.get_backend()
    try:
        import tltorch
    except ImportError:
        return None
    finally:
        tensorly.set_backend(before)
    return tltorch


def _picked(plan):
    """What an auto plan runs, e.g. 'factorized (fastest order: depthwise over modes 0,1,2)'."""
    if plan.accelerator:
        return f"fused ({plan.accelerator})"
    if plan.order != "fastest":
        return plan.strategy
    merged = [",".join(map(str, s.modes)) for s in plan.steps if len(s.modes) > 1]
    return f"{plan.strategy} (fastest order" + (f": depthwise over modes {'; '.join(merged)})" if merged else ")")


def _gemm_floor(batch, c, r, t, spatial, device):
    """The two 1x1 convolutions of a CP chain alone (C -> R, R -> T over every position): a
    lower bound for any factorized forward that runs them as float32 library GEMMs: oneDNN's
    channels-last 1x1 conv (the plans' steps on a CPU are torch.matmul, within about 20 % of it
    either way on large products and faster on small ones; the floor is kept as it was measured)."""
    import torch
    import torch.nn.functional as F

    positions = int(np.prod(spatial))
    a = torch.randn(batch, positions, 1, c, device=device).movedim(-1, 1)
    w1 = torch.randn(r, c, 1, 1, device=device)
    w2 = torch.randn(t, r, 1, 1, device=device)
    return lambda: F.conv2d(F.conv2d(a, w1), w2)


def _r2plus1d_matched(c, device):
    """A (2+1)D conv (1x3x3 C->M, 3x1x1 M->C) with about the dense conv's parameters (as R(2+1)D)."""
    import torch

    m = max(1, (27 * c * c) // (9 * c + 3 * c))
    return torch.nn.Sequential(
        torch.nn.Conv3d(c, m, (1, 3, 3), padding=(0, 1, 1), bias=False),
        torch.nn.Conv3d(m, c, (3, 1, 1), padding=(1, 0, 0), bias=False),
    ).to(device)


#: torchvision's r3d_18 convolutions on a (B, 3, 16, 112, 112) clip: (C, T, kernel, stride, padding, input D/H/W)
R3D18_CONVS = [
    ("stem", 3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), (16, 112, 112)),
    ("layer1", 64, 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), (16, 56, 56)),
    ("layer2.0", 64, 128, (3, 3, 3), (2, 2, 2), (1, 1, 1), (16, 56, 56)),
    ("layer2", 128, 128, (3, 3, 3), (1, 1, 1), (1, 1, 1), (8, 28, 28)),
    ("layer3.0", 128, 256, (3, 3, 3), (2, 2, 2), (1, 1, 1), (8, 28, 28)),
    ("layer3", 256, 256, (3, 3, 3), (1, 1, 1), (1, 1, 1), (4, 14, 14)),
    ("layer4.0", 256, 512, (3, 3, 3), (2, 2, 2), (1, 1, 1), (4, 14, 14)),
    ("layer4", 512, 512, (3, 3, 3), (1, 1, 1), (1, 1, 1), (2, 7, 7)),
]


def _r3d18(num_classes=400):
    """torchvision's r3d_18 (its own definition where torchvision imports; otherwise the same
    topology written out here: stem 3x7x7 stride (1, 2, 2), four stages of two basic blocks with
    3x3x3 convs, 1x1x1 projections, BatchNorm3d, global pooling, fc). Returns (model, source)."""
    import torch
    from torch import nn

    try:
        from .._torchvision import torchvision_models

        return torchvision_models().video.r3d_18(num_classes=num_classes), "torchvision.models.video.r3d_18"
    except ImportError:
        pass

    class Block(nn.Module):
        def __init__(self, c_in, c, stride):
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv3d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm3d(c), nn.ReLU(True))
            self.conv2 = nn.Sequential(nn.Conv3d(c, c, 3, 1, 1, bias=False), nn.BatchNorm3d(c))
            self.downsample = (
                nn.Sequential(nn.Conv3d(c_in, c, 1, stride, bias=False), nn.BatchNorm3d(c))
                if stride != 1 or c_in != c
                else None
            )

        def forward(self, x):
            skip = x if self.downsample is None else self.downsample(x)
            return torch.relu(self.conv2(self.conv1(x)) + skip)

    stages, c_in = [], 64
    for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages.append(nn.Sequential(Block(c_in, c, stride), Block(c, c, 1)))
        c_in = c
    model = nn.Sequential(
        nn.Sequential(nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False), nn.BatchNorm3d(64), nn.ReLU(True)),
        *stages,
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )
    return model, "r3d_18 topology (torchvision not importable here)"


def _priced_accelerator(plan):
    """Whether the plan's first accelerator is one ``auto`` weighs (a compiled kernel, not the
    torch.compile / tiled runners of ``fused``)."""
    from .. import accelerators

    return plan.accelerator is not None and "auto" in accelerators.get(plan.accelerator).serves


def _torch_cpu(targets):
    return any(b == "torch" and str(d).startswith("cpu") for b, d in targets)


def _ms(t, name):
    return round(t[name]["median_ms"], 2)


def _ratio(t, a, b):
    return round(t[a]["median_ms"] / t[b]["median_ms"], 2)
