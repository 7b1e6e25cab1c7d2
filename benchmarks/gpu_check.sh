#!/usr/bin/env bash
# The prepared device run (one GPU with torch + triton, no vLLM, no internet; at most ~8 minutes):
#   1. the Triton kernels against their torch references on CUDA (decode, continuation prefill, store, tables);
#   2. benchmarks/kernels_gpu.py at the target shapes: decode attention at batch 1/8/32 x context 1K-128K against
#      the bf16 paged kernel (fraction of copy bandwidth and of the static roofline), the store against a prefill
#      layer, a decode step captured in and replayed from a CUDA graph, continuation prefill fused vs workspace;
#   3. the static roofline and the device's identity.
# Everything lands in $OUT (JSON + markdown + PNG + logs); the exit status is non-zero if a step failed.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh             # on the GPU machine, from the repository root
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh --dry-run   # here: the same steps on the CPU, tiny shapes, interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
status=0

if [[ ${1:-} == --dry-run ]]; then
  export TRITON_INTERPRET=1
  tests=(tests/kernels/test_tables.py)
  bench=(--dry-run --dtypes e8-k3v2)
else
  tests=(tests/kernels/test_decode_attention.py tests/kernels/test_prefill_attention.py tests/kernels/test_store.py
         tests/kernels/test_tables.py)
  bench=(--batch 1 8 32 --context 1024 4096 32768 131072 --prefill-chunks 512 2048 --prefill-contexts 4096 32768)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/device.txt"
cat "$OUT/device.txt"

echo "== kernel tests"
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" --junitxml "$OUT/kernel_tests.xml" 2>&1 \
  | tee "$OUT/kernel_tests.log" || status=1

echo "== kernel benchmark"
timeout 300 "$PYTHON" -m benchmarks.kernels_gpu "${bench[@]}" --out "$OUT" 2>&1 | tee "$OUT/kernels_gpu.log" || status=1

echo "== static roofline"
"$PYTHON" -m benchmarks.kernels_gpu --model-only --out "$OUT" > /dev/null || status=1

ls -l "$OUT"
exit $status
