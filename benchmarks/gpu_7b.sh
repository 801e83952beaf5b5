#!/usr/bin/env bash
# The prepared GPU check (issue 7): 7B seq 256 bs 1, seq 2048 bs 1 (activation checkpointing), and the
# largest batch at seq 256 under 12 GiB. Each run is its own process under a timeout; one JSON line each
# goes to $OUTDIR/gpu_7b.jsonl (stderr to $OUTDIR/*.log).
#
#   bash benchmarks/gpu_7b.sh [OUTDIR]                        # on the GPU machine (H100: ~70 s per run, ~5 min)
#   CONFIG=configs/llama_20m.yaml SEQ_LONG=512 DEVICE=cpu STEPS=2 bash benchmarks/gpu_7b.sh /tmp/dry  # dry run
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-benchmarks/results/gpu}}
CONFIG=${CONFIG:-configs/llama_7b.yaml}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-5}
PY=${PY:-python3}
SEQ_LONG=${SEQ_LONG:-2048}
BUDGET=${BUDGET:-12GiB}
T_RUN=${T_RUN:-150}       # seconds per measurement (H100: ~70 s, of which the 7B build 3 s)
MAX_SEARCH=${MAX_SEARCH:-3}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUTDIR"
J="$OUTDIR/gpu_7b.jsonl"
EXTRA="train.check_updates=true"

run() {  # label, overrides...
  local label=$1; shift
  echo "== $label: $*" >&2
  timeout -k 10 "$T_RUN" $PY benchmarks/memory.py --config "$CONFIG" --device "$DEVICE" --steps "$STEPS" \
      --label "$label" --profile "$OUTDIR/$label.prof" --timeline "$OUTDIR/$label.timeline.jsonl" "$@" $EXTRA >"$OUTDIR/$label.out" 2>"$OUTDIR/$label.log"
  local rc=$?
  if [ $rc -eq 0 ] && [ -s "$OUTDIR/$label.out" ]; then tail -n 1 "$OUTDIR/$label.out" | tee -a "$J"
  else echo "{\"label\": \"$label\", \"overrides\": \"$*\", \"rc\": $rc, \"error\": \"$(tail -n 1 "$OUTDIR/$label.log" | tr -d '\"\\\\' | cut -c1-300)\"}" | tee -a "$J"; fi
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTDIR/nvidia-smi.txt" 2>&1 || true
$PY -c "import sys, torch, transformers, bitsandbytes; print(sys.version.split()[0], torch.__version__, \
torch.cuda.is_available(), transformers.__version__, bitsandbytes.__version__)" 2>&1 | tail -n 1 | tee "$OUTDIR/env.txt" >&2
run seq256_bs1 train.seq_len=256 train.batch_size=1
run seq${SEQ_LONG}_bs1 train.seq_len=$SEQ_LONG train.batch_size=1

# Largest batch at seq 256 under the budget: start at the planner's largest fitting batch, then step
# up while max_memory_reserved + CUDA context stays under the budget, down on OOM / over budget.
bs=$($PY - "$CONFIG" "$BUDGET" "$DEVICE" <<'PY'
import sys
from qapollo.config import load_config
from qapollo.memory import parse_bytes, predict_peak
path, budget, dev = sys.argv[1], parse_bytes(sys.argv[2]), sys.argv[3]
best = 1
for b in range(1, 257):
    p = predict_peak(load_config(path, ["train.seq_len=256", f"train.batch_size={b}"]), dev)
    if p["peak_bytes"] + p["context_bytes"] > budget: break
    best = b
print(best)
PY
)
echo "planner: largest batch at seq 256 under $BUDGET = $bs" >&2
best=0; tried=0; dir=0
while [ $tried -lt "$MAX_SEARCH" ] && [ "$bs" -ge 1 ]; do
  tried=$((tried + 1))
  if run seq256_bs$bs train.seq_len=256 train.batch_size=$bs; then
    fits=$($PY -c "
import json,sys; from qapollo.memory import parse_bytes, CUDA_CONTEXT_BYTES
r=json.loads(open('$OUTDIR/seq256_bs$bs.out').read().splitlines()[-1])
m=r.get('max_memory_reserved') or r.get('peak_live_tensor_bytes') or 0
print(1 if m + (CUDA_CONTEXT_BYTES if r['device']=='cuda' else 0) <= parse_bytes('$BUDGET') else 0)")
  else fits=0; fi
  if [ "$fits" = 1 ]; then best=$bs; [ $dir -lt 0 ] && break; dir=1; bs=$((bs + (bs + 7) / 8))
  else [ $dir -gt 0 ] && break; dir=-1; bs=$((bs * 3 / 4)); fi
done
echo "{\"label\": \"largest_batch_seq256\", \"budget\": \"$BUDGET\", \"batch_size\": $best}" | tee -a "$J"
