"""Render a `tensorconv bench --out DIR` results.json as the markdown tables of docs/benchmarks.md.

    python benchmarks/render.py bench-out/cpu/results.json > docs/benchmarks-tables.md
"""
import json
import sys

COLUMNS = {
    "fig6": ["channels", "model", "backend", "analytic_macs", "macs", "params", "median_ms", "min_ms", "max_ms"],
    "backends": ["kernel", "n_spatial", "rank", "backend", "pass_", "strategy", "macs", "median_ms", "min_ms",
                 "max_ms", "ratio_to_fastest"],
    "peers": ["device", "channels", "rank", "r", "impl", "median_ms", "min_ms", "max_ms", "vs_dense",
              "vs_tltorch_factorized", "mac_ratio", "auto_picked"],
    "roofline": ["backend", "kind", "modes", "macs", "bytes", "measured_ms", "roofline_ms", "efficiency"],
    "targets": ["device", "batch", "channels", "rank", "mac_ratio", "dense_fwd_ms", "factorized_fwd_ms", "fused_fwd_ms",
                "fwd_speedup", "fused_fwd_speedup", "fwd_speedup_over_mac_ratio", "dense_fwd_bwd_ms",
                "factorized_fwd_bwd_ms", "fused_fwd_bwd_ms", "fwd_bwd_speedup", "fused_fwd_bwd_speedup"],
}


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return "" if v is None else str(v)


def main(path):
    data = json.load(open(path))
    env = data["environment"]
    print(f"Measured {env['date']} on {env['processor']} ({env['cpus']} CPUs), Python {env['python']}, "
          f"numpy {env['numpy']}, torch {env.get('torch', '-')} ({env.get('torch_threads', '-')} threads), "
          f"tensorly-torch {env.get('tltorch', 'not installed')}, GPU: {env.get('gpu', 'none')}. "
          f"Allocator: {env['allocator']}. Command: `{env['command']}` ({env['seconds']} s). "
          f"Times in ms, median of the runs (min / max beside).\n")
    for suite, cols in COLUMNS.items():
        rows = [r for r in data["rows"] if r["suite"] == suite]
        if not rows:
            continue
        print(f"### {suite}\n")
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
