#!/usr/bin/env bash
# The runtime's GPU check (issue 11): attention kernels, MFU of a >= 1B model, estimate vs
# measured, memory. For a lent GPU: run from anywhere in the repository with python3 (no pip):
#
#   bash benchmarks/gpu_runtime.sh            # on the GPU, about 2 minutes on an H200 (at most ~3)
#   bash benchmarks/gpu_runtime.sh --smoke    # anywhere, tiny models on the CPU, ~20 s: checks the script
#
# Writes benchmarks/results/runtime_gpu.{json,md} (with --smoke: runtime_smoke.* in a temporary
# folder) and copies them to $OUT when it is set. Each part runs in its own process under its own
# time limit, so a crash or a hang in one still leaves the other's results; inside a part, the
# results are rewritten after every kernel.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "${1:-}" = "--smoke" ]; then
    args=(--device cpu --smoke --tag smoke)
    results="${TMPDIR:-/tmp}/hydraulis-runtime-smoke"
    limits=(120 120)
else
    args=(--device cuda --tag gpu)
    results="benchmarks/results"
    limits=(100 80)
fi
start=$(date +%s)
status=0

echo "== attention kernels (limit ${limits[0]} s)"
timeout "${limits[0]}" python3 benchmarks/runtime.py --lengths code_kafka --parts attention --budget-s 70 \
    --out-dir "$results" "${args[@]}" || { status=$?; echo "attention part exited with $status"; }

echo "== MFU and memory (limit ${limits[1]} s)"
timeout "${limits[1]}" python3 benchmarks/runtime.py --lengths code_kafka --parts mfu --append \
    --out-dir "$results" "${args[@]}" || { rc=$?; status=$rc; echo "mfu part exited with $rc"; }

echo "== done in $(( $(date +%s) - start )) s; results in $results"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$results"/runtime_"${args[-1]}".* "$OUT"/ 2>/dev/null && echo "copied to $OUT"
fi
exit "$status"
