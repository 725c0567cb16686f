#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent GPU (the device tool's `run`):
#
#   bash benchmarks/gpu_all.sh            # on one H200: about 6-9 minutes
#   bash benchmarks/gpu_all.sh --smoke    # rehearsal on the CPU with tiny models
#
# 1. benchmarks/gpu_runtime.sh   (issue 11): attention kernels, MFU of a >= 1B model,
#    calibrated estimate vs measured step, peak memory vs the memory model;
# 2. benchmarks/gpu_costmodel.sh (issue 16): calibration on packed micro-batches of the
#    llama-7b shape (4-layer copy scaled per layer), measured plans on code_kafka;
# 3. benchmarks/gpu_hf.sh        (issues 15, 11): hf_packed_inputs exact on CUDA (tests/test_hf.py),
#    the shared attention kernels and the calibration decoder on CUDA (tests/test_kernels_*.py,
#    tests/test_decoder.py).
# python3 only, no pip from a registry. OR-tools is not needed (no CP-SAT on these paths);
# if wheels were carried in .whl/, they go to /tmp/site, *after* the image's packages on
# PYTHONPATH, so nothing the image has is shadowed. Results are written under
# benchmarks/results/ and, when $OUT is set, packed after every part into
# $OUT/gpu_results.tgz (the device tool brings back at most 8 files) with the two
# summaries beside it.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
SMOKE=()
[ "${1:-}" = "--smoke" ] && SMOKE=(--smoke)
DEST="${OUT:-}"
unset OUT  # the parts would copy their own files; this script packs them instead
LOGS="${TMPDIR:-/tmp}/hydraulis-gpu-logs"
mkdir -p "$LOGS"
T0=$(date +%s)
stamp() { echo "[gpu_all +$(( $(date +%s) - T0 ))s] $*"; }

if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" && stamp "carried wheels on PYTHONPATH (after the image's)"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} | tee "$LOGS/environment.txt"

pack() {
    [ -n "$DEST" ] || return 0
    mkdir -p "$DEST"
    tar czf "$DEST/gpu_results.tgz" benchmarks/results/runtime_gpu.* benchmarks/results/runtime_smoke.* \
        benchmarks/results/gpu_costmodel_* "$LOGS" 2> /dev/null
    cp benchmarks/results/runtime_gpu.md "$DEST/" 2> /dev/null
    for s in benchmarks/results/gpu_costmodel_*/summary.md; do [ -f "$s" ] && cp "$s" "$DEST/costmodel_summary.md"; done
    stamp "packed results into $DEST"
}

stamp "part 1/3: runtime (issue 11)"
bash benchmarks/gpu_runtime.sh "${SMOKE[@]}" 2>&1 | tee "$LOGS/gpu_runtime.log"
RUNTIME_STATUS=${PIPESTATUS[0]}
stamp "runtime finished with status $RUNTIME_STATUS"
pack

stamp "part 2/3: cost model (issue 16)"
bash benchmarks/gpu_costmodel.sh "${SMOKE[@]}" 2>&1 | tee "$LOGS/gpu_costmodel.log"
COST_STATUS=${PIPESTATUS[0]}
stamp "cost model finished with status $COST_STATUS"
pack

stamp "part 3/3: Hugging Face packed inputs and attention kernels on CUDA (issues 15, 11)"
if [ ${#SMOKE[@]} -eq 0 ]; then
    OUT="$LOGS" timeout 200 bash benchmarks/gpu_hf.sh > /dev/null 2>&1
    HF_STATUS=$?
    tail -5 "$LOGS/hf_gpu.log" 2> /dev/null
else
    HF_STATUS=skipped  # the same tests run on the CPU in the suite
fi
stamp "hf finished with status $HF_STATUS"
pack

stamp "done: runtime $RUNTIME_STATUS, cost model $COST_STATUS, hf $HF_STATUS"
[ "$RUNTIME_STATUS" = 0 ] && [ "$COST_STATUS" = 0 ] && { [ "$HF_STATUS" = 0 ] || [ "$HF_STATUS" = skipped ]; }
