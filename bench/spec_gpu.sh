#!/usr/bin/env bash
# Speculative decoding with real acceptance on one GPU, in one command (under 10 minutes on
# an H200): train the target, its EAGLE-1/EAGLE-3 heads and a draft (bench/train_spec.py,
# gpu size), then measure every method against speculation off (bench/spec.py --trained).
# Usage: bench/spec_gpu.sh [OUT_DIR]   (default $OUT, else bench/results); STEPS=N overrides
# the training steps per model (1500 by default; lower it if the budget is tight); SIZE=gpu-large
# trains the 24-layer, width-1024 target instead of the 8-layer, width-512 one; MODELS="eagle"
# trains only those proposers and METHODS="ngram eagle eagle_tree" measures only those.
set -euo pipefail
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
work=$(mktemp -d)
quiet() { grep -v -E "Warning|warn|Loading|Writing" || true; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
start=$(date +%s)
python3 bench/train_spec.py --out "$work/trained" --device cuda --size "${SIZE:-gpu}" \
  ${STEPS:+--steps "$STEPS"} ${MODELS:+--models $MODELS} 2>&1 | quiet | tee "$out/train_spec.txt"
cp "$work/trained/train.json" "$out/spec-train.json"
echo "training took $(( $(date +%s) - start ))s" | tee -a "$out/train_spec.txt"
python3 bench/spec.py --trained "$work/trained" --device cuda --dtype bfloat16 \
  --max-tokens 128 --k 4 --tree-topk 4 --tree-nodes 16 ${METHODS:+--methods $METHODS} \
  --json "$out/spec-h200-trained.json" 2>&1 | quiet | tee "$out/spec.txt"
echo "total $(( $(date +%s) - start ))s" | tee -a "$out/spec.txt"
