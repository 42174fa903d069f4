"""What a plan tells its caller: a table of its steps (``describe``) and their times (``profile``)."""

from __future__ import annotations

import time

from .structure import weight_arrays

__all__ = ["describe", "profile"]


def describe(plan) -> str:
    """A table of the steps: primitive, modes, indices summed, output shape, MACs, bytes."""
    st, g = plan.structure, plan.geometry
    lines = [
        f"ConvPlan: {st.kind} kernel {st.shape}, input {plan.input_shape} -> output {plan.output_shape}",
        f"  strategy: {plan.strategy}"
        + (f", {plan.order} order" if plan.order else "")
        + f" (requested {plan.requested})"
        + (
            ", estimates: " + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in plan.estimates.items())
            if plan.estimates
            else ""
        ),
        f"  geometry: stride={g.stride} padding={g.padding} dilation={g.dilation} padding_mode={g.padding_mode}",
    ]
    accelerators = plan.decision.accelerators
    if accelerators:
        said = "; ".join(f"{a.name}: {a.summary}" if a.summary else a.name for a in accelerators)
        lines.append(f"  fused: {said}; otherwise the steps below, unfused")
    lines += [
        "",
        f"  {'#':>2}  {'primitive':<10} {'operands':<22} {'modes':<8} {'summed':<14} {'output shape':<26} "
        f"{'MACs':>15} {'bytes':>13}",
    ]
    ids = ["x"] + [op.name for op in st.operands]
    for k, s in enumerate(plan.steps):
        if s.kind == "dense":
            ops = "x, W" if plan.strategy == "dense" else "x, W(rebuilt)"
        else:
            ops = f"{ids[s.lhs]}, {ids[s.rhs]}"
        ids.append(f"#{k}")
        modes = ",".join(str(m) for m in s.modes) or "-"
        lines.append(
            f"  {k:>2}  {s.kind:<10} {ops:<22} {modes:<8} {','.join(s.summed) or '-':<14} "
            f"{str(tuple(s.out_shape)):<26} {s.macs:>15,} {s.nbytes:>13,}"
        )
    ratio = plan.dense_macs / plan.macs if plan.macs else float("inf")
    lines += ["", f"  activation MACs: {plan.macs:,}   weight-only MACs: {plan.weight_macs:,}"]
    if plan.min_macs != plan.macs and plan.order:
        lines.append(
            f"  fewest-MAC factorized order: {plan.min_macs:,} activation MACs (this order merges "
            f"factors: fewer passes over memory)"
        )
    lines += [
        f"  dense MACs: {plan.dense_macs:,}   (dense / plan = {ratio:.2f}x)",
        f"  peak intermediate bytes: {plan.peak_bytes:,}",
    ]
    return "\n".join(lines)


def profile(plan, x, kernel, *, repeat=5, sync=None):
    """Median seconds of each step (factorized plans) or of the whole call (fused, dense)."""
    sync = sync or (lambda: None)
    backend = plan.check_call(x, kernel)
    whole = plan.strategy != "factorized"
    per_step = [[] for _ in ([None] if whole else plan.steps)]

    def timer(j, run):
        sync()
        t0 = time.perf_counter()
        out = run()
        sync()
        per_step[j].append(time.perf_counter() - t0)
        return out

    batched_x = x if plan.batched else x[None]
    arrays = weight_arrays(kernel, plan.structure, backend)
    for _ in range(repeat + 1):  # the first round warms up and is dropped
        if whole:
            timer(0, lambda: plan._execute(backend, x, kernel))
        else:
            plan.run_steps(backend, batched_x, arrays, timer)
    return [sorted(t[1:])[len(t[1:]) // 2] for t in per_step]
