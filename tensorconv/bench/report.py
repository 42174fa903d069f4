"""The rows as a table, and Figure 6 as a plot."""

from __future__ import annotations


def format_rows(rows):
    lines = []
    by_suite = {}
    for r in rows:
        by_suite.setdefault(r["suite"], []).append(r)
    for suite, items in by_suite.items():
        lines.append(f"\n== {suite} ==")
        keys = [k for k in items[0] if k not in ("suite", "runs")]
        lines.append(" | ".join(keys))
        for r in items:
            lines.append(" | ".join(_fmt(r.get(k)) for k in keys))
    return "\n".join(lines)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def plot_fig6(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = ("3D-Conv", "CP-HOConv-6", "CP-HOConv-3")
    backends = sorted({r["backend"] for r in rows})
    for model in models:
        pts = sorted({(r["channels"], r["analytic_macs"]) for r in rows if r["model"] == model})
        ax1.plot([f"{c}x{c}" for c, _ in pts], [2 * m / 1e9 for _, m in pts], marker="o", label=model)
        for backend in backends:
            sel = sorted(
                (r["channels"], r["median_ms"]) for r in rows if r["model"] == model and r["backend"] == backend
            )
            if sel:
                ax2.plot([f"{c}x{c}" for c, _ in sel], [t for _, t in sel], marker="o", label=f"{model} ({backend})")
    ax1.set_yscale("log")
    ax1.set_ylabel("GFLOPs (2 x MACs of the 1x1/depthwise/1x1 plan)")
    ax1.set_xlabel("input x output channels")
    ax1.set_title("Figure 6: FLOPs, input 16x32x32, kernel 3x3x3")
    ax1.legend()
    ax2.set_yscale("log")
    ax2.set_ylabel("forward time, median (ms)")
    ax2.set_xlabel("input x output channels")
    ax2.set_title("measured")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
