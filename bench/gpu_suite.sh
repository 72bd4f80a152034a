#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go: throughput against transformers and
# batch-1 decode beside the HBM roofline, for Llama-3.2-1B- and Llama-3.1-8B-shaped random
# bf16 checkpoints. Usage: bench/gpu_suite.sh OUT_DIR [PRESET ...]
set -euo pipefail
out=${1:-bench/results}; shift || true
presets=${*:-llama-3.2-1b llama-3.1-8b}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for preset in $presets; do
  python3 bench/throughput.py --device cuda --preset "$preset" --roofline \
    --json "$out/throughput-$preset.json" 2>&1 | grep -v -E "Warning|warn|Loading|Writing"
done
