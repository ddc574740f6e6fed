#!/usr/bin/env bash
# One prepared command for anyone with an NVIDIA GPU: the self-test, the real-GPU tests and a GPU
# speed run, in under 8 minutes, on a bare machine with PyTorch (CUDA build), nvcc and ninja and
# no network. Results go where the benchmarks keep theirs: benchmarks/results/<gpu>/.
#
#     bash tools/gpu_check.sh            # exit status 1 if any part failed
#
# Needs: python3 with torch (CUDA), numpy, safetensors, tokenizers, pytest; nvcc and ninja (the
# kernels build at first use). The app's UI packages (gradio, plotly) are not needed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RWKV_PLAYGROUND_CACHE="${RWKV_PLAYGROUND_CACHE:-$PWD/build/kernels}"
PY="${PYTHON:-python3}"
status=0

slug=$("$PY" - <<'PY'
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
PY
)
out="benchmarks/results/$slug"
mkdir -p "$out"
echo "== GPU: $slug; results in $out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"

echo "== 1/3 self-test: every kernel and step against its reference (CPU and GPU)"
timeout 300 "$PY" -m rwkv_playground.selftest --json > "$out/selftest.json" || status=1
"$PY" - "$out/selftest.json" <<'PY' || status=1
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    print(f"{r['check']:14s} {r['implementation']:28s} {r['device']:5s} {r['dtype']:5s} "
          f"err {r['max_error']:.2e} (tol {r['tolerance']:.0e}) {'ok' if r['ok'] else 'MISMATCH'} {r['note']}")
bad = [r for r in rows if not r["ok"]]
print(f"{len(rows) - len(bad)} of {len(rows)} checks passed")
sys.exit(1 if bad else 0)
PY

echo "== 2/3 the real-GPU tests (pytest -m gpu)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_wkv_kernels.py tests/test_wkv_matrix_kernels.py \
  2>&1 | tee "$out/pytest_gpu.txt" || status=1

echo "== 3/3 speed on the GPU"
(cd benchmarks && timeout 240 "$PY" bench_gpu.py) || status=1

echo "== gpu_check: $([ $status = 0 ] && echo 'all parts passed' || echo 'SOME PART FAILED') (results: $out)"
exit $status
