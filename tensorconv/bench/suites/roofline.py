"""``tensorconv bench roofline``: see :func:`run`."""

from __future__ import annotations

import numpy as np

from ...kernels import KruskalKernel
from ...plans.cost import calibrate
from ...plans.plan import plan_conv
from ..common import _array_device, _label, _make_input
from ..timing import _Progress, _sync


def run(args, targets):
    """Per plan step: MACs, bytes, measured time and the roofline bound from a same-run calibration."""
    rows = []
    c = 32 if args.quick else 64
    shape = (args.batch, c, 16, 32, 32)
    # per-step timings of eager calls: jax runs a plan as one compiled program, with no steps to time
    targets = [(b, d) for b, d in targets if b != "jax"]
    prog = _Progress(len(targets), "roofline")
    for backend, device in targets:
        dev = _array_device(device)
        # the same-run roofline's rates (the plans below keep the shipped defaults, as users' do)
        model = calibrate(backend, dev)
        k = KruskalKernel.random((c, c, 3, 3, 3), rank=c, backend=backend, dtype="float32", device=dev, seed=5)
        x = _make_input(backend, device, shape)
        plan = plan_conv(k, shape, padding=1, strategy="factorized", dtype="float32", backend=backend, device=device)
        times = plan.profile(x, k, repeat=args.repeat, sync=lambda: _sync(device))
        if backend == "torch":
            fused = plan_conv(k, shape, padding=1, strategy="fused", dtype="float32", backend=backend, device=device)
            fused(x, k)
            total = fused.profile(x, k, repeat=args.repeat, sync=lambda: _sync(device))[0]
            bound = sum(max(s.macs / model.macs_per_s, s.nbytes / model.bytes_per_s) for s in plan.steps)
            macs = sum(s.macs for s in plan.steps)
            # a fused chain moves only its input and output through memory
            io_bytes = 4 * (x.numel() + int(np.prod(plan.output_shape)))
            fused_bound = max(macs / model.macs_per_s, io_bytes / model.bytes_per_s)
            rows.append(
                dict(
                    suite="roofline",
                    backend=_label(backend, device),
                    kind="fused (whole chain)",
                    modes=[],
                    macs=macs,
                    bytes=io_bytes,
                    measured_ms=1e3 * total,
                    roofline_ms=1e3 * fused_bound,
                    efficiency=fused_bound / total,
                    unfused_roofline_ms=1e3 * bound,
                    peak_macs_per_s=model.macs_per_s,
                    bandwidth_bytes_per_s=model.bytes_per_s,
                )
            )
        for step, secs in zip(plan.steps, times):
            bound = max(step.macs / model.macs_per_s, step.nbytes / model.bytes_per_s)
            rows.append(
                dict(
                    suite="roofline",
                    backend=_label(backend, device),
                    kind=step.kind,
                    modes=list(step.modes),
                    macs=step.macs,
                    bytes=step.nbytes,
                    measured_ms=1e3 * secs,
                    roofline_ms=1e3 * bound,
                    efficiency=bound / secs if secs else None,
                    peak_macs_per_s=model.macs_per_s,
                    bandwidth_bytes_per_s=model.bytes_per_s,
                )
            )
        prog.step(backend)
    prog.close()
    return rows
