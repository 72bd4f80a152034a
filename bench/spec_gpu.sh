#!/usr/bin/env bash
# Speculative decoding with real acceptance on one GPU: train the target and its proposers
# (bench/train_spec.py, the 24-layer, width-1024 gpu-large size by default), then measure
# every method against speculation off (bench/spec.py --trained): chains of 4 tokens, EAGLE
# trees of 16 nodes, 2 children a round, 8 deep, at most 128 tree nodes a step. The target and
# the EAGLE head alone (MODELS=eagle METHODS="ngram eagle eagle_tree") take ~7 minutes on an
# H200 (their training alone 300-360 s: give the call its whole 10 minutes); everything takes longer than one 10-minute device call, so split it with MODELS and
# METHODS. Usage: bench/spec_gpu.sh [OUT_DIR] (default $OUT, else bench/results);
# STEPS=N overrides the training steps of every model (at gpu-large: 1500 for the target,
# 2000 for the EAGLE heads, 600 for the draft model); SIZE=gpu trains the
# 8-layer, width-512 target instead; MODELS="eagle" trains only those proposers and
# METHODS="ngram eagle eagle_tree" measures only those; TREE="TOPK NODES DEPTH" another tree;
# NGRAM_MAX=N n-gram lookup's prompt_lookup_max (4 by default); TREE_BATCH=T the tree's
# max_num_batched_draft_tokens (trees shrink when a step's trees would verify more than T;
# 0: never);
# TARGET_STEPS, SEQ and BATCH override the target's steps and the rows' shape; with WORK=DIR
# holding an earlier run's DIR/trained, training is skipped (RETRAIN=1 trains anyway).
set -euo pipefail
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
work=${WORK:-$(mktemp -d)}
quiet() { grep -v -E "Warning|warn|Loading|Writing" || true; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
read -r topk nodes depth <<< "${TREE:-2 16 8}"
start=$(date +%s)
if [[ ! -f "$work/trained/train.json" || -n "${RETRAIN:-}" ]]; then
  python3 bench/train_spec.py --out "$work/trained" --device cuda --size "${SIZE:-gpu-large}" \
    ${STEPS:+--steps "$STEPS"} ${TARGET_STEPS:+--target-steps "$TARGET_STEPS"} \
    ${SEQ:+--seq "$SEQ"} ${BATCH:+--batch "$BATCH"} \
    ${MODELS:+--models $MODELS} 2>&1 | quiet | tee "$out/train_spec.txt"
  echo "training took $(( $(date +%s) - start ))s" | tee -a "$out/train_spec.txt"
fi
cp "$work/trained/train.json" "$out/spec-train.json"
python3 bench/spec.py --trained "$work/trained" --device cuda --dtype bfloat16 \
  --max-tokens 128 --k 4 --tree-topk "$topk" --tree-nodes "$nodes" --tree-depth "$depth" \
  --ngram-max "${NGRAM_MAX:-4}" --tree-batch-tokens "${TREE_BATCH:-128}" \
  ${METHODS:+--methods $METHODS} \
  --json "$out/spec-h200-trained.json" 2>&1 | quiet | tee "$out/spec.txt"
echo "total $(( $(date +%s) - start ))s" | tee -a "$out/spec.txt"
