#!/usr/bin/env bash
# The GPU checks in one run (a lent GPU machine, or any CUDA machine): the `gpu` tests, then benchmarks/gpu_step.py,
# whose JSON compares each measured peak with the memory planner's prediction. Logs and JSON go to $OUT (default
# outputs/gpu_check). Usage: bash scripts/gpu_check.sh [python]   (default: .venv/bin/python, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
"$PY" benchmarks/gpu_step.py --output "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, gpu_step exit $bench"
exit $(( tests || bench ))
