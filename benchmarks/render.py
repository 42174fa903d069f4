"""Render a `tensorconv bench --out DIR` results.json as the markdown tables of docs/benchmarks.md.

python benchmarks/render.py bench-out/cpu/results.json > docs/benchmarks-tables.md
python benchmarks/render.py NEW/results.json --before OLD/results.json   # + a before/after table
"""

import json
import sys

COLUMNS = {
    "fig6": ["channels", "model", "backend", "analytic_macs", "macs", "params", "median_ms", "min_ms", "max_ms"],
    "backends": [
        "kernel",
        "n_spatial",
        "rank",
        "backend",
        "pass_",
        "strategy",
        "macs",
        "median_ms",
        "min_ms",
        "max_ms",
        "ratio_to_fastest",
    ],
    "peers": [
        "device",
        "channels",
        "rank",
        "r",
        "impl",
        "pass_",
        "median_ms",
        "min_ms",
        "max_ms",
        "vs_dense",
        "vs_tltorch_factorized",
        "mac_ratio",
        "auto_picked",
    ],
    "roofline": ["backend", "kind", "modes", "macs", "bytes", "measured_ms", "roofline_ms", "efficiency"],
    "targets": [
        "device",
        "batch",
        "channels",
        "rank",
        "mac_ratio",
        "dense_fwd_ms",
        "factorized_fwd_ms",
        "fused_fwd_ms",
        "auto_fwd_ms",
        "gemm_floor_ms",
        "fwd_speedup",
        "fused_fwd_speedup",
        "auto_fwd_speedup",
        "fwd_speedup_over_mac_ratio",
        "dense_fwd_bwd_ms",
        "factorized_fwd_bwd_ms",
        "fused_fwd_bwd_ms",
        "auto_fwd_bwd_ms",
        "fwd_bwd_speedup",
        "fused_fwd_bwd_speedup",
        "auto_fwd_bwd_speedup",
        "auto_picked",
    ],
}


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return "" if v is None else str(v)


def _status(ok_all, ok_any):
    return "met" if ok_all else ("partly met" if ok_any else "**missed**")


def targets_summary(rows):
    """The issues' speed targets, evaluated on this run's rows (markdown table)."""
    out = ["| target | measured (this run) | status |", "|---|---|---|"]
    peers = [r for r in rows if r["suite"] == "peers" and r["device"] == "cpu"]
    tg = [r for r in rows if r["suite"] == "targets" and r["device"] == "cpu"]

    def peer(c, rank, impl, p="forward"):
        for r in peers:
            if r["channels"] == c and r["rank"] == rank and r["impl"] == impl and r.get("pass_", "forward") == p:
                return r
        return None

    chans = sorted({r["channels"] for r in peers})
    for p, goal in (("forward", 3.0), ("forward+backward", 2.5)):
        cells, oks = [], []
        for c in chans:
            best = max(
                (peer(c, "R=C", i, p) or {}).get("vs_tltorch_factorized", 0)
                for i in ("tensorconv factorized", "tensorconv fused", "tensorconv auto")
            )
            floor = peer(c, "R=C", "floor: the two 1x1 GEMMs alone", p)
            if best:
                # the floor's own ratio is the most any chain of these GEMMs could reach
                cells.append(
                    f"C={c}: {best:.2f}x" + (f" (GEMMs alone: {floor['vs_tltorch_factorized']:.2f}x)" if floor else "")
                )
                oks.append(best >= goal)
        if cells:
            out.append(
                f"| torch CPU, B=1, R=C: {p} >= {goal}x faster than tensorly-torch factorized (best of "
                f"factorized / fused / auto) | {'; '.join(cells)} | {_status(all(oks), any(oks))} |"
            )
    for key, goal, label in (("fwd", 0.6, "forward"), ("fwd_bwd", 0.4, "forward+backward")):
        cells, oks = [], []
        for r in tg:
            if r["rank"] != r["channels"]:
                continue
            unfused = r["fwd_speedup" if key == "fwd" else "fwd_bwd_speedup"] / r["mac_ratio"]
            fused = r[f"fused_{key}_speedup"] / r["mac_ratio"]
            auto = r.get(f"auto_{key}_speedup", 0) / r["mac_ratio"]
            bound = (
                f"; GEMMs alone {r['dense_fwd_ms'] / r['gemm_floor_ms'] / r['mac_ratio']:.2f}"
                if key == "fwd" and r.get("gemm_floor_ms")
                else ""
            )
            cells.append(f"B={r['batch']} C={r['channels']}: {unfused:.2f} (fused {fused:.2f}, auto {auto:.2f}{bound})")
            oks.append(max(unfused, fused, auto) >= goal)
        if cells:
            out.append(
                f"| R=C: {label} speedup over dense Conv3d >= {goal} x MAC ratio | {'; '.join(cells)} | "
                f"{_status(all(oks), any(oks))} |"
            )
    for mult, goal, label in ((3, 1.0, "faster than dense Conv3d"), (6, 1.5, "within 1.5x of dense Conv3d")):
        for r in tg:
            if r["batch"] == 8 and r["rank"] == mult * r["channels"]:
                # auto counts only where it runs a factorized or fused plan (reconstructed is a dense conv)
                auto = (
                    r.get("auto_fwd_ms") if str(r.get("auto_picked", "")).startswith(("factorized", "fused")) else None
                )
                best = min(t for t in (r["factorized_fwd_ms"], r["fused_fwd_ms"], auto) if t)
                ratio = best / r["dense_fwd_ms"]
                auto_txt = f"auto {r['auto_fwd_ms']:.1f} ms ({r['auto_picked']}), " if r.get("auto_fwd_ms") else ""
                out.append(
                    f"| B=8, C={r['channels']}, R={mult}C forward: {label} | factorized {r['factorized_fwd_ms']:.1f} ms, "
                    f"fused {r['fused_fwd_ms']:.1f} ms, {auto_txt}dense {r['dense_fwd_ms']:.1f} ms "
                    f"(best factorized/dense {ratio:.2f}"
                    + (
                        f"; the two 1x1 GEMMs alone {r['gemm_floor_ms'] / r['dense_fwd_ms']:.2f}"
                        if r.get("gemm_floor_ms")
                        else ""
                    )
                    + ") | "
                    f"{_status(ratio < goal if mult == 3 else ratio <= goal, False)} |"
                )
    worst, where = 0.0, ""
    for c in chans:
        for rank in ("R=C", "R=matched"):
            a, f, rc = (peer(c, rank, f"tensorconv {s}") for s in ("auto", "factorized", "reconstructed"))
            if a and f and rc:
                ratio = a["median_ms"] / min(f["median_ms"], rc["median_ms"])
                if ratio > worst:
                    worst, where = ratio, f"C={c} {rank}"
    if where:
        out.append(
            f"| auto within 1.15x of the faster of factorized / reconstructed (peers, forward) | worst {worst:.2f}x "
            f"({where}) | {_status(worst <= 1.15, False)} |"
        )
    be = [r for r in rows if r["suite"] == "backends" and r["pass_"] == "forward"]
    ratios = []
    for r in be:
        if r["backend"] != "numpy":
            continue
        for t in be:
            if (
                t["backend"] == "torch"
                and t["strategy"] == r["strategy"]
                and t["kernel"] == r["kernel"]
                and t["n_spatial"] == r["n_spatial"]
                and t["rank"] == r["rank"]
            ):
                ratios.append((r["median_ms"] / t["median_ms"], f"{r['kernel']} N={r['n_spatial']} {r['rank']}"))
    if ratios:
        cells = "; ".join(f"{w}: {x:.2f}x" for x, w in ratios)
        out.append(
            f"| NumPy within 3x of torch CPU on the same plan (backends, forward) | {cells} | "
            f"{_status(all(x <= 3 for x, _ in ratios), any(x <= 3 for x, _ in ratios))} |"
        )
    cells, oks = [], []
    for r in tg:
        cells.append(
            f"B={r['batch']} C={r['channels']} R={r['rank']}: {r['fused_fwd_bwd_ms']:.0f} vs "
            f"{r['factorized_fwd_bwd_ms']:.0f} ms"
        )
        oks.append(r["fused_fwd_bwd_ms"] < r["factorized_fwd_bwd_ms"])
    if cells:
        out.append(
            f"| fused forward+backward faster than unfused | {'; '.join(cells)} | {_status(all(oks), any(oks))} |"
        )
    gpu = [r for r in rows if r.get("device") == "cuda" or r.get("backend") in ("torch-cuda", "cupy")]
    if not gpu:
        out.append("| GPU targets (issues #6, #7) | no GPU in this run | not measured |")
    return "\n".join(out)


def _best_speedup(r):
    """dense / (fastest factorized-family forward) of a targets row, and which one it was."""
    cands = {"factorized": r["factorized_fwd_ms"], "fused": r["fused_fwd_ms"]}
    if r.get("auto_fwd_ms") and str(r.get("auto_picked", "")).startswith(("factorized", "fused")):
        cands["auto"] = r["auto_fwd_ms"]
    name = min(cands, key=cands.get)
    return r["dense_fwd_ms"] / cands[name], name


def before_after(rows, before_rows):
    """Forward speedup over dense Conv3d per targets point: an earlier run next to this one."""
    out = [
        "| B | C | R | MAC ratio | before: dense / best | after: dense / best | after: factorized / auto (same run) |",
        "|---|---|---|---|---|---|---|",
    ]
    old = {(r["batch"], r["channels"], r["rank"]): r for r in before_rows if r["suite"] == "targets"}
    for r in rows:
        if r["suite"] != "targets" or (r["batch"], r["channels"], r["rank"]) not in old:
            continue
        b, (a, which) = _best_speedup(old[(r["batch"], r["channels"], r["rank"])]), _best_speedup(r)
        same_run = ""
        if r.get("auto_fwd_ms"):
            same_run = (
                f"{r['factorized_fwd_ms'] / r['auto_fwd_ms']:.2f}"
                if str(r.get("auto_picked", "")).startswith(("factorized", "fused"))
                else f"(auto: {r['auto_picked']})"
            )
        out.append(
            f"| {r['batch']} | {r['channels']} | {r['rank']} | {r['mac_ratio']:.1f} | {b[0]:.2f} ({b[1]}) | "
            f"{a:.2f} ({which}) | {same_run} |"
        )
    return "\n".join(out)


def main(path, before=None):
    data = json.load(open(path))
    env = data["environment"]
    if "accelerators" in env:
        built = env["accelerators"] or {}
        said = (
            ", ".join(f"{k} {'built' if v else 'unavailable'}" for k, v in built.items()) or "none serve these targets"
        )
    else:  # results.json of versions before 0.3.0
        said = {True: "plane chain built", False: "plane chain unavailable", None: "not used"}[env.get("cpu_kernel")]
    print(
        f"Measured {env['date']} on {env['processor']} ({env['cpus']} CPUs), Python {env['python']}, "
        f"numpy {env['numpy']}, torch {env.get('torch', '-')} ({env.get('torch_threads', '-')} threads), "
        f"tensorly-torch {env.get('tltorch', 'not installed')}, GPU: {env.get('gpu', 'none')}. "
        f"Allocator: {env['allocator']}. Accelerators: {said}. "
        f"Command: `{env['command']}` ({env['seconds']} s). "
        f"Times in ms, median of the runs (min / max beside).\n"
    )
    print("### targets, evaluated on this run\n")
    print(targets_summary(data["rows"]))
    print()
    if before:
        prev = json.load(open(before))
        print(f"### before / after (before: {prev['environment']['date']}, `{before}`)\n")
        if prev["environment"]["processor"] != env["processor"]:
            # a ratio to dense Conv3d on the same machine travels better than a time, but the
            # two machines' dense convs differ too: the table is not the kernel's change alone
            print(
                f"The before run is from another machine ({prev['environment']['processor']}, "
                f"{prev['environment']['cpus']} CPUs): compare the ratios with care.\n"
            )
        print(before_after(data["rows"], prev["rows"]))
        print()
    # suites without a column list print every key of their rows, in the order the suite wrote them
    others = [s for s in dict.fromkeys(r["suite"] for r in data["rows"]) if s not in COLUMNS]
    for suite, cols in list(COLUMNS.items()) + [(s, None) for s in others]:
        rows = [r for r in data["rows"] if r["suite"] == suite]
        if not rows:
            continue
        cols = cols or [k for k in rows[0] if k not in ("suite", "runs")]
        print(f"### {suite}\n")
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
        print()


if __name__ == "__main__":
    args = sys.argv[1:]
    before = args[args.index("--before") + 1] if "--before" in args else None
    main(args[0], before)
