#!/usr/bin/env bash
# The GPU loan's script: everything that needs a CUDA GPU, in at most BUDGET seconds (default 480, 8 minutes, of a
# 15-minute loan that also pays for the machine's start), each phase under a hard `timeout`, results written as each
# phase ends (a timeout keeps what was done). BENCHMARKS.md ("GPU script") has the command and the results.
#   bench/gpu.sh OUTDIR
# Phases (bench/gpu_bench.py; each python command also skips its own steps that cannot end before its deadline):
#   check  float32 greedy tokens, compiled fast path against model.generate, real widths, 4 layers  (cap 150 s)
#   speed  random idefics-9b in bf16: warm-up, batch 1 vs the model-card recipe, 16 concurrent, mixed adapters
#   facts  bench/gpu_facts.py: placement, bitsandbytes 4-bit, the sampler on CUDA (tiny model; what time is left)
# OUTDIR gets report.md (all of it, rebuilt after each phase), results.json, check.md, speed.md, facts.md, log.txt:
# six files (a device run brings back at most eight).
# A machine without the pinned transformers/peft/bitsandbytes gets them from wheels in WHEELS (default .whl/, see
# BENCHMARKS.md), installed into /tmp/site, never into its own environment.
# Settings (environment): BUDGET, DEVICE (cuda; cpu with SIZE=tiny for a dry run), SIZE (real | tiny), PHASES
# (default "check speed facts"), PYTHON (python3), WHEELS, and extra arguments for gpu_bench.py in BENCH_ARGS.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$(date +%s)
deadline=$((started + ${BUDGET:-480}))
out=${1:-${OUT:-bench/results/gpu}}
device=${DEVICE:-cuda} size=${SIZE:-real} py=${PYTHON:-python3} wheels=${WHEELS:-.whl}
mkdir -p "$out"
rm -f "$out"/{report.md,results.json,check.md,speed.md,facts.md,log.txt}
log=$out/log.txt phases=()

report() {  # report.md: the machine, the phases so far, each phase's own Markdown
  {
    echo "# GPU script (bench/gpu.sh): $(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null)"
    echo
    echo "Machine: ${machine:-?}"
    echo
    printf '%s\n' "${phases[@]}"
    for part in check speed facts; do
      if [[ -f $out/$part.md ]]; then echo; cat "$out/$part.md"; fi
    done
  } >"$out/report.md.tmp" && mv "$out/report.md.tmp" "$out/report.md"
}

phase() {  # phase NAME CAP COMMAND...: run COMMAND under `timeout` (CAP seconds or what is left), then report
  local name=$1 cap=$2; shift 2
  local left=$((deadline - $(date +%s) - 5))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    phases+=("- $name: skipped, ${left} s left"); report; return
  fi
  local began=$(date +%s)
  echo "=== $name (limit ${limit} s)" >>"$log"
  PHASE_DEADLINE=$((began + limit - 10)) timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local what="exit $rc"; ((rc == 124 || rc == 137)) && what="stopped by its ${limit} s timeout"
  phases+=("- $name: $what, $(($(date +%s) - began)) s")
  echo "=== $name: $what" >>"$log"
  report
}

if ls "$wheels"/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl >>"$log" 2>&1 && export PYTHONPATH=/tmp/site \
    || echo "wheels from $wheels failed to install" >>"$log"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}"
if [[ $device == cuda ]]; then
  machine=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)
else
  machine="CPU ($(nproc) cores), a dry run of the code path"
fi
report

bench() {  # bench COMMAND: bench/gpu_bench.py with the phase's deadline
  "$py" bench/gpu_bench.py "$1" --out "$out" --device "$device" --size "$size" --deadline "$PHASE_DEADLINE" \
    ${BENCH_ARGS:-}
}
export -f bench
export out device size py BENCH_ARGS
for name in ${PHASES:-check speed facts}; do
  case $name in
    check) phase check 150 bash -c 'bench check' ;;
    speed) phase speed $((deadline - $(date +%s) - 60)) bash -c 'bench speed' ;;  # 60 s kept for facts
    facts) phase facts 90 bash -c '"$py" bench/gpu_facts.py --device "$device" >"$out/facts.md.tmp" \
             && { echo "## Facts (bench/gpu_facts.py, tiny model)"; echo; cat "$out/facts.md.tmp"; } >"$out/facts.md";
             rc=$?; rm -f "$out/facts.md.tmp"; exit $rc' ;;
  esac
done
echo "- total: $(($(date +%s) - started)) s of a ${BUDGET:-480} s budget" >>"$out/report.md"
cat "$out/report.md"
