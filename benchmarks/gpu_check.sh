#!/usr/bin/env bash
# ONE script for a lent GPU machine (H100/H200), < 8 minutes, nothing fetched from the internet:
#   the test suite with its torch-CUDA and CuPy variants, `tensorconv verify` on the GPU backends,
#   and `tensorconv bench --quick` on torch-cuda (and CuPy).
# Prepare here:  bash benchmarks/fetch_gpu_wheels.sh
# Device call:   command "bash benchmarks/gpu_check.sh", carry [".whl"]
# Results go to $OUT (or ./gpu-check-out): tests.log, verify.log, verify.json, bench.log, results.json, fig6.png.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu-check-out}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site" || { echo "wheel install failed"; exit 1; }
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 - <<'PY' | tee -a "$OUT_DIR/gpu.txt"
import torch, importlib.util
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
if importlib.util.find_spec("cupy"):
    import cupy
    print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
PY
status=0
# 1. the tests, GPU variants included (they skip on CPU-only machines)
timeout 240 python3 -m pytest tests docs -q -x -W ignore -p no:cacheprovider \
  2>&1 | tee "$OUT_DIR/tests.log" | tail -25 || status=1
# 2. every derivation on the GPU backends
timeout 90 python3 -m tensorconv verify --backend torch-cuda --backend cupy --dtype float64 --dtype float32 \
  --cases 5 --json "$OUT_DIR/verify.json" 2>/dev/null | tee "$OUT_DIR/verify.log" | tail -40 || status=1
# 3. the quick benchmark on the GPU
timeout 150 python3 -m tensorconv bench --quick --backend torch-cuda --backend cupy --out "$OUT_DIR" \
  2>/dev/null | tee "$OUT_DIR/bench.log" | tail -80 || status=1
echo "gpu_check exit status: $status"
exit $status
