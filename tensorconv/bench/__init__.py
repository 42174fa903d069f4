"""``tensorconv bench``: the benchmark harness (comparing backends, peers and plans is part of the product).

``timing`` measures (medians of interleaved runs), ``environment`` records the machine and
process, ``report`` prints the rows and plots Figure 6, and each suite is one module of
``suites`` whose ``run(args, targets)`` returns rows (dicts). ``tensorconv.cli`` only parses
the arguments.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

from .common import _targets
from .environment import _set_malloc_no_trim, environment
from .report import format_rows, plot_fig6

__all__ = ["SUITES", "QUICK_SUITES", "run"]

SUITES = (
    "fig6",
    "backends",
    "peers",
    "roofline",
    "targets",
    "r3d18",
    "models",
    "decompose",
    "accelerators",
    "depthwise",
    "auto",
    "memory",
    "layers",
    "varlen",
)
#: what ``--quick`` runs when no suite is named: the headline comparisons, in about a minute
QUICK_SUITES = ("fig6", "backends", "peers", "models", "accelerators", "auto")


def _suite_function(name):
    return importlib.import_module(f"{__name__}.suites.{name}").run


def run(args, *, open_output, write_output):
    """Run the suites ``args`` names (parsed by ``tensorconv.cli``); prints the table and writes
    ``results.json`` (and ``fig6.png``) under ``args.out``."""
    suites = args.suites or list(QUICK_SUITES if args.quick else SUITES)
    args.batch = 1 if args.batch is None else args.batch
    # quick: every suite at its small sizes, each point timed for about half a second (a smoke
    # run of the harness in about a minute); the full suites take as long as they need
    args.repeat = (3 if args.quick else 7) if args.repeat is None else args.repeat
    args.budget = 0.5 if args.quick else 20.0
    if args.batch < 1 or args.repeat < 1:
        raise SystemExit("--batch and --repeat must be >= 1")
    output = open_output(args.out, directory=True, filename="results.json", flag="--out") if args.out else None
    if args.allocator == "no-trim":
        ok = _set_malloc_no_trim()
        args.allocator_note = (
            "glibc mallopt: M_MMAP_THRESHOLD=1GiB, M_TRIM_THRESHOLD=inf" if ok else "default (no glibc mallopt here)"
        )
    else:
        args.allocator_note = "glibc default"
    targets = _targets(args)
    from .. import accelerators

    # the accelerators of the targets' devices built (or loaded) before anything is timed, so
    # that auto weighs them and fused never builds mid-run
    serving = {a.name: a for b, d in targets for a in accelerators.for_device(b, d)}
    args.accelerators_built = {name: acc.build() for name, acc in serving.items()}
    t0 = time.perf_counter()
    rows = []
    suite_seconds = {}
    for suite in suites:
        start = time.perf_counter()
        rows += _suite_function(suite)(args, targets)
        suite_seconds[suite] = round(time.perf_counter() - start, 1)
    env = environment(args)
    env["suite_seconds"] = suite_seconds
    env["seconds"] = round(time.perf_counter() - t0, 1)
    env["command"] = "tensorconv bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    print(format_rows(rows))
    print(f"\n(ran in {env['seconds']} s; allocator: {env['allocator']})")
    if output is not None:
        write_output(output, json.dumps({"environment": env, "rows": rows}, indent=1), flag="--out")
        fig_rows = [r for r in rows if r["suite"] == "fig6"]
        if fig_rows:
            try:
                plot_fig6(fig_rows, os.path.join(args.out, "fig6.png"))
            except ImportError:
                print("matplotlib is not installed: no fig6.png (pip install 'tensorconv[bench]')", file=sys.stderr)
    return 0
