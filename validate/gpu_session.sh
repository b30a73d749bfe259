#!/usr/bin/env bash
# One GPU session for the allocator model (issue 13), from the repo root on the GPU box:
#   bash validate/gpu_session.sh [SLICE]        (SLICE as --slice; default 0:)
# 1. python -m memplan.validate.alloc_trace for two jobs, 2-layer cuts;
# 2. memplan validate --allocator both from SLICE of the matrix: each job under the default allocator
#    and then with expandable_segments:True, until the time budget is spent; it prints the --slice the
#    rest start at.
# Files in $OUT: results.jsonl, alloc-traces.jsonl, session.log. The whole run stays under SESSION_S
# seconds (default 540: the device's 10-minute command limit less setup slack); rows are fsynced as they
# arrive, so the outer timeout loses at most the pair in flight. Setup: `bash validate/gpu_pack.sh` here
# first, and carry ".gpu". Dry form without a GPU: DEVICE=cpu MATRIX=quick (the traces are skipped).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
SLICE=${1:-0:}
SESSION_S=${SESSION_S:-540}
JOB_S=${JOB_S:-90}      # per worker: the slowest default-matrix row on the H100 took 42 s
TRACE_S=${TRACE_S:-120} # both traces together
DEVICE=${DEVICE:-cuda}
MATRIX=${MATRIX:-default}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1

if [ "$DEVICE" = cuda ] && [ -d .gpu/whl ]; then  # the dry form uses this machine's packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .gpu/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/gpu-site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c 'import memplan' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/memplan . || exit 3
  export PYTHONPATH=/tmp/memplan${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - "$DEVICE" <<'PY' || { echo "gpu_session: setup failed (above): nothing measured"; exit 3; }
import sys
import memplan.cli, torch, transformers, peft, bitsandbytes  # noqa: F401  what validate imports
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "bitsandbytes", bitsandbytes.__version__)
assert sys.argv[1] != "cuda" or torch.cuda.is_available(), "no GPU visible"
PY

if [ "$DEVICE" = cuda ]; then
  # a QLoRA job (its earlier trace is in validate/results/alloc-traces-H200-2026-11-24.jsonl) and a bf16 LoRA one
  timeout "$TRACE_S" "$PY" -m memplan.validate.alloc_trace --layers 2 --out "$OUT/alloc-traces.jsonl" \
    --job '{"model": "mistral-7b", "method": "qlora", "optimizer": "paged_adamw_8bit", "micro_batch": 4, "seq_len": 2048}' \
    --job '{"model": "llama-2-7b", "method": "lora", "micro_batch": 4, "seq_len": 1024}' >/dev/null \
    || echo "gpu_session: alloc_trace stopped (exit $?)"
fi

left=$((SESSION_S - SECONDS))
# no pair starts in the last ~100 s: a typical pair (2 x ~20 s on an H200) plus validate's start and table
budget=$((left - 100))
if [ "$budget" -le 0 ]; then echo "gpu_session: no time left for validate"; exit 0; fi
timeout "$((left - 5))" "$PY" -m memplan validate --device "$DEVICE" --matrix "$MATRIX" --allocator both \
  --slice "$SLICE" --time-budget "$budget" --timeout "$JOB_S" --out "$OUT/results.jsonl"
echo "gpu_session: validate exit $? after ${SECONDS} s"
