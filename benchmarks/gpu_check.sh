#!/usr/bin/env bash
# GPU check for one CUDA machine, under 8 minutes: the MoE layer benchmark at all three sizes
# (bf16) and one bf16 epoch of real training through Ray Train + DeepSpeed with NCCL.
# JSON goes to $OUT (or benchmarks/results/ when OUT is unset):
#   moe_layer_cuda.json, gpu_epoch_cuda.json
# Usage: benchmarks/gpu_check.sh        (PYTHON=... picks the interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${OUT:-benchmarks/results}

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: no Python at $PY (set PYTHON=... to an environment with requirements.lock)" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); run this on a CUDA machine" >&2
  exit 2
fi
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0 DVC_NO_ANALYTICS=1
start=$(date +%s)

# 1. MoE layer: fusemoe, mid and large sizes, softmax and Laplace gates (~3 min on an H100).
timeout 300 "$PY" benchmarks/moe_layer.py --device cuda --sizes fusemoe mid large \
  --out "$DEST/moe_layer_cuda.json"

# 2. One bf16 epoch through Ray Train + DeepSpeed (NCCL) on P12: prepared here (~20 s) when the raw
#    files are at $FUSEMOE_DATA_DIR and data/processed is missing; synthetic data otherwise.
if [[ ! -f data/processed/manifest.json && -d "${FUSEMOE_DATA_DIR:-}" ]]; then
  timeout 120 "$PY" -m pipelines.prepare
fi
timeout $((470 - ($(date +%s) - start))) "$PY" benchmarks/gpu_epoch.py \
  --out "$DEST/gpu_epoch_cuda.json"

echo "gpu_check: done in $(($(date +%s) - start)) s; JSON in $DEST"
