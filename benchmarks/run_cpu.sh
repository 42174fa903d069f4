#!/usr/bin/env bash
# The full CPU run behind docs/benchmarks.md: every suite, then the markdown tables.
# Needs the bench extra (matplotlib, tqdm, and tensorly-torch as the peer):
#   pip install torch==2.13.0 -e ".[bench]"
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/cpu}"
python -m tensorconv bench --out "$out" "${@:2}"
python benchmarks/render.py "$out/results.json" > "$out/tables.md"
echo "tables: $out/tables.md, plot: $out/fig6.png"
