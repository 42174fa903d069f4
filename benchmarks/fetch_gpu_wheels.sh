#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a device call: the GPU image has torch, CuPy, Triton,
# opt_einsum, hypothesis, pytest, matplotlib and tqdm, but not tensorly (nor tensorly-torch,
# the optional benchmark peer). Both are pure-Python wheels; they go to .whl/ (git-ignored
# locally) and travel with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: -d .whl tensorly==0.10.0 tensorly-torch==0.5.0
ls -la .whl
