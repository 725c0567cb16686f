#!/usr/bin/env bash
# GPU check of issue 16, the cost model on real kernels. From the repository root:
#
#   PYTHONPATH=$PWD bash benchmarks/gpu_costmodel.sh           # one H200: about 2-3 minutes
#   PYTHONPATH=$PWD bash benchmarks/gpu_costmodel.sh --smoke   # rehearsal on the CPU, tiny model
#
# python3 only, no pip: torch, numba, numpy, pyarrow (OR-tools is not needed: no CP-SAT).
# Three parts, each on its own, so that one failing leaves the others' results:
#   0. (in the background) a planner run on the CPU that fills numba's cache, so that
#      part 2 does not compile the kernels on the clock of the GPU run;
#   1. calibrate: llama-7b shape, a 4-layer copy (~1.07 B parameters) on packed
#      micro-batches (one long, many short, mixed, drawn from code_kafka), scaled per layer
#      to 32 layers; --strict marks an unreliable fit (exit status 3);
#   2. measure: code_kafka on 8xH200 (256K tokens per step, micro-batches <= 16,384 tokens),
#      the balancer and every baseline, 2 sampled steps; every replica's micro-batches run
#      on this GPU one replica after another (the same 4-layer copy, calibrated first).
# Results: benchmarks/results/gpu_costmodel_<device>/ (summary.md, calibration.{json,log},
# measure/{measured.json,measured.md,plans.jsonl,cost_model.json}, measure.log), copied to
# $OUT/gpu_costmodel_<device>/ when OUT is set.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="${PYTHONPATH:-$PWD}"
cd "$(dirname "$0")/.." || exit 1

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
if [ "$SMOKE" = 1 ]; then
  MODEL=tiny; LAYERS=1; CLUSTER=4xcpu; TOKENS=8K; CAPACITY=1024; BUDGET=1024; STEPS=1; REPEATS=2
  CPU_FLAGS=(--threads 1 --clock process); CAL_TIMEOUT=300; MEASURE_TIMEOUT=600
else
  MODEL=llama-7b; LAYERS=4; CLUSTER=8xH200; TOKENS=256K; CAPACITY=16384; BUDGET=16384; STEPS=2; REPEATS=3
  CPU_FLAGS=(); CAL_TIMEOUT=100; MEASURE_TIMEOUT=170
fi
DATA=code_kafka
T0=$(date +%s)
stamp() { echo "[gpu_costmodel +$(( $(date +%s) - T0 ))s] $*"; }

DEVICE=$(python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
SLUG=$(echo "$DEVICE" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
[ "$SMOKE" = 1 ] && SLUG="smoke-$SLUG"
RES=benchmarks/results/gpu_costmodel_$SLUG
rm -rf "$RES" && mkdir -p "$RES"
stamp "device: $DEVICE -> $RES"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$RES/environment.txt"

stamp "part 0: warming numba's cache in the background"
WARM=$(mktemp -d)
python3 -m hydraulis.cli simulate --lengths "$DATA" --cluster 8xH200 --model llama-7b --steps 1 \
  --tokens-per-step 256K --no-plots --out "$WARM" > "$RES/warm_numba.log" 2>&1 &
WARM_PID=$!

# run_part NAME TIMEOUT LOG ARGS...: one hydraulis command under a timeout, its output teed to LOG.
# A failure other than an unreliable fit (3) or a timeout (124) is retried once with SDPA
# attention, in case the varlen kernel of this torch build fails on the real shapes.
run_part() {
  local name=$1 limit=$2 log=$3; shift 3
  timeout "$limit" python3 -m hydraulis.cli "$@" 2>&1 | tee "$log"
  local status=${PIPESTATUS[0]}
  if [ "$status" != 0 ] && [ "$status" != 3 ] && [ "$status" != 124 ]; then
    stamp "$name failed with status $status; retrying with --attention sdpa"
    timeout "$limit" python3 -m hydraulis.cli "$@" --attention sdpa 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
  fi
  return "$status"
}

stamp "part 1: calibrate $MODEL (depth $LAYERS, scaled) on packed micro-batches"
run_part calibrate "$CAL_TIMEOUT" "$RES/calibration.log" calibrate --model "$MODEL" --layers "$LAYERS" \
  --lengths "$DATA" --budget "$BUDGET" --repeats "$REPEATS" --strict --quiet ${CPU_FLAGS[@]+"${CPU_FLAGS[@]}"} \
  --out "$RES/calibration.json"
CAL_STATUS=$?
stamp "part 1 finished with status $CAL_STATUS (0 ok, 3 unreliable fit, 124 timeout)"

wait "$WARM_PID"; stamp "part 0 finished with status $?"; rm -rf "$WARM"

stamp "part 2: measured plans, $DATA on $CLUSTER, $STEPS steps"
run_part measure "$MEASURE_TIMEOUT" "$RES/measure.log" measure --model "$MODEL" --layers "$LAYERS" \
  --cluster "$CLUSTER" --lengths "$DATA" --tokens-per-step "$TOKENS" --token-capacity "$CAPACITY" \
  --budget "$BUDGET" --steps "$STEPS" --repeats "$REPEATS" ${CPU_FLAGS[@]+"${CPU_FLAGS[@]}"} --out "$RES/measure"
MEASURE_STATUS=$?
stamp "part 2 finished with status $MEASURE_STATUS"

{
  echo "# Cost model on $DEVICE (issue 16)"
  echo
  echo "\`benchmarks/gpu_costmodel.sh$([ "$SMOKE" = 1 ] && echo ' --smoke')\`; $(cat "$RES/environment.txt");"
  echo "statuses: calibrate $CAL_STATUS, measure $MEASURE_STATUS; $(( $(date +%s) - T0 )) s in all."
  echo
  echo "## Calibration: $MODEL, depth $LAYERS timed, scaled per layer"
  echo
  echo '```'
  grep -E "^(device|fit|scaled|token capacity|attention|one sequence|warning)" "$RES/calibration.log" || echo "(no calibration output)"
  echo '```'
  echo
  echo "Micro-batches (measured at depth $LAYERS, fitted; depth 0; scaled; fitted):"
  echo
  grep -E "^\|" "$RES/calibration.log" || echo "(none)"
  echo
  echo "Calibration of the executed copy (part 2):"
  echo
  echo '```'
  grep -E "^(device|fit|warning|estimate/measured)" "$RES/measure.log" || echo "(no output)"
  echo '```'
  echo
  echo "## Measured plans"
  echo
  cat "$RES/measure/measured.md" 2>/dev/null || echo "(no measurement: see measure.log)"
} > "$RES/summary.md"
stamp "wrote $RES/summary.md"
cat "$RES/summary.md"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp -r "$RES" "$OUT/" && stamp "copied to $OUT/$(basename "$RES")"
fi
[ "$CAL_STATUS" = 0 ] && [ "$MEASURE_STATUS" = 0 ]
