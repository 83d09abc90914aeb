#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one run with time limits (for a lent GPU machine; BENCHMARKS.md has the
# results): placement and bitsandbytes 4-bit on CUDA (bench/gpu_facts.py), then the real-size speed benchmark.
#   bench/gpu.sh [OUTDIR]
# A machine without the pinned transformers/peft/bitsandbytes gets them from wheels in .whl/ (BENCHMARKS.md says
# how to download them), installed into /tmp/site, never into its own environment.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout "${FACTS_SECONDS:-180}" python3 bench/gpu_facts.py >"$out/facts.md" 2>"$out/facts.log"
echo "gpu_facts: exit $?"; cat "$out/facts.md"
timeout "${SPEED_SECONDS:-420}" python3 bench/speed.py --real-size --repeats 2 --new-tokens 128 --concurrent-tokens 64 \
  --json "$out/speed.json" >"$out/speed.md" 2>"$out/speed.log"
echo "speed: exit $?"; cat "$out/speed.md"; tail -n 20 "$out/speed.log"
