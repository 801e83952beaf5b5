#!/usr/bin/env bash
# The prepared GPU check, one command: 7B speed with the compiled int8 kernels ("fused", the CUDA
# default) against the eager reference path (model.fused_update=false), at seq 256 batch 1 and at the
# largest batch at seq 256 under 12 GiB, with the step-time breakdown (issue 15); the peaks against the
# planner (issue 7). Each run is its own process under a timeout; one JSON line each goes to
# $OUTDIR/gpu_7b.jsonl; its stdout/stderr and profiler table (<label>.out/.log/.prof) go to
# $OUTDIR/logs.tgz, refreshed after every run (a device call brings back at most 8 files).
#
#   1. tests/test_fused.py on the GPU: Triton kernel vs eager CUDA vs CPU reference codes (tie flips)
#   2. seq 256 bs 1: fused, then reference                          (benchmarks/breakdown.py)
#   3. largest batch at seq 256 under $BUDGET, fused: planner-seeded search, ≤ $MAX_SEARCH tries
#   4. the reference path at that batch
#   5. optional: seq $SEQ_LONG bs 1, fused (the memory goal)          (SEQ_LONG=2048 to run it)
# Everything stops before $TOTAL_S seconds (a device call may last 600 s), so what ran comes back.
#
#   bash benchmarks/gpu_7b.sh [OUTDIR]
#   CONFIG=configs/llama_20m.yaml DEVICE=cpu STEPS=1 BUDGET=1200MiB TESTS=0 bash benchmarks/gpu_7b.sh /tmp/dry  # dry run (CPU: peak RSS)
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-benchmarks/results/gpu}}
CONFIG=${CONFIG:-configs/llama_7b.yaml}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-3}          # plain steps, then as many instrumented ones (breakdown.py), after step 1
PY=${PY:-python3}
SEQ_LONG=${SEQ_LONG:-}
BUDGET=${BUDGET:-12GiB}
T_RUN=${T_RUN:-150}        # seconds per run at most (7B build, compile, 2·STEPS+2 steps)
TOTAL_S=${TOTAL_S:-540}
MAX_SEARCH=${MAX_SEARCH:-3}
TESTS=${TESTS:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
J="$OUTDIR/gpu_7b.jsonl"
W=$(mktemp -d)  # per-run files, packed into $OUTDIR/logs.tgz
pack() { tar czf "$OUTDIR/logs.tgz" -C "$W" . ; }
START=$(date +%s)
left() { echo $((TOTAL_S - ($(date +%s) - START))); }

run() {  # label, overrides...: breakdown.py under a timeout; its JSON line (or an error line) to $J
  local label=$1; shift
  local t; t=$(left); [ "$t" -gt "$T_RUN" ] && t=$T_RUN
  if [ "$t" -lt 30 ]; then echo "{\"label\": \"$label\", \"skipped\": \"out of time\"}" | tee -a "$J"; return 1; fi
  echo "== $label ($t s): $*" >&2
  timeout -k 10 "$t" $PY benchmarks/breakdown.py --config "$CONFIG" --device "$DEVICE" --steps "$STEPS" \
      --label "$label" --profile "$W/$label.prof" "$@" train.check_updates=true >"$W/$label.out" 2>"$W/$label.log"
  local rc=$?
  if [ $rc -eq 0 ] && [ -s "$W/$label.out" ]; then tail -n 1 "$W/$label.out" | tee -a "$J"
  else echo "{\"label\": \"$label\", \"overrides\": \"$*\", \"rc\": $rc, \"error\": \"$(tail -n 1 "$W/$label.log" | tr -d '\"\\\\' | cut -c1-300)\"}" | tee -a "$J"; fi
  pack
  return $rc
}

fits() {  # label: 1 if its peak (CUDA: reserved + context; CPU: peak RSS) is under the budget
  $PY - "$W/$1.out" "$BUDGET" <<'PY'
import json, sys
from qapollo.plan import parse_bytes
from qapollo.planner import CUDA_CONTEXT_BYTES
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
cuda = r["device"] == "cuda"
m = max(r["max_memory_reserved"], r["first_step_max_memory_reserved"]) + CUDA_CONTEXT_BYTES if cuda else r["peak_rss_bytes"]
print(1 if m <= parse_bytes(sys.argv[2]) else 0)
PY
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTDIR/env.txt" 2>&1 || true
$PY -c "import sys, torch, transformers, bitsandbytes; from torch.utils._triton import has_triton; \
print(sys.version.split()[0], torch.__version__, torch.cuda.is_available(), 'triton', has_triton(), \
transformers.__version__, bitsandbytes.__version__)" 2>&1 | tail -n 1 | tee -a "$OUTDIR/env.txt" >&2
if [ "$TESTS" = 1 ]; then  # the tie-flip counts (lines "... vs cpu_ref: ... differing [codes, scales, zeros]") go to $J
  timeout -k 10 $(( $(left) / 3 )) $PY -m pytest -q -s -p no:cacheprovider tests/test_fused.py -k cuda > "$W/test_fused_cuda.log" 2>&1
  rc=$?
  $PY - "$W/test_fused_cuda.log" $rc <<'PY' | tee -a "$J"
import json, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
print(json.dumps({"label": "test_fused_cuda", "rc": int(sys.argv[2]), "result": lines[-1] if lines else "",
                  "differing": [l.strip() for l in lines if "vs cpu_ref" in l]}))
PY
  pack
fi

run seq256_bs1_fused train.seq_len=256 train.batch_size=1 model.fused_update=auto
run seq256_bs1_ref train.seq_len=256 train.batch_size=1 model.fused_update=false

# Largest batch at seq 256 under the budget (fused path): start at the planner's largest fitting batch,
# then step up while the peak stays under the budget, down on OOM / over budget.
bs=$($PY - "$CONFIG" "$BUDGET" "$DEVICE" <<'PY'
import sys
from qapollo.config import load_config
from qapollo.plan import parse_bytes
from qapollo.planner import predict_peak
path, budget, dev = sys.argv[1], parse_bytes(sys.argv[2]), sys.argv[3]
best = 1
for b in range(1, 257):
    p = predict_peak(load_config(path, ["train.seq_len=256", f"train.batch_size={b}"]), dev)
    if (p["rss_bytes"] if dev == "cpu" else p["peak_bytes"] + p["context_bytes"]) > budget: break
    best = b
print(best)
PY
)
echo "planner: largest batch at seq 256 under $BUDGET = $bs" >&2
best=0; tried=0; dir=0
while [ $tried -lt "$MAX_SEARCH" ] && [ "$bs" -ge 1 ]; do
  tried=$((tried + 1))
  if run seq256_bs${bs}_fused train.seq_len=256 train.batch_size=$bs model.fused_update=auto; then
    f=$(fits seq256_bs${bs}_fused)
  else f=0; fi
  if [ "$f" = 1 ]; then best=$bs; [ $dir -lt 0 ] && break; dir=1; bs=$((bs + (bs + 7) / 8))
  else [ $dir -gt 0 ] && break; dir=-1; bs=$((bs * 3 / 4)); fi
done
echo "{\"label\": \"largest_batch_seq256\", \"budget\": \"$BUDGET\", \"batch_size\": $best}" | tee -a "$J"
[ "$best" -ge 1 ] && run seq256_bs${best}_ref train.seq_len=256 train.batch_size=$best model.fused_update=false
[ -n "$SEQ_LONG" ] && run seq${SEQ_LONG}_bs1_fused train.seq_len=$SEQ_LONG train.batch_size=1 model.fused_update=auto
pack
echo "done in $(( $(date +%s) - START )) s" >&2
