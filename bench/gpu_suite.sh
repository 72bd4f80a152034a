#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, on one machine:
#   check       bench/gpu_check.py: kernels, mixed-step graphs and overlap equal the SDPA reference
#   overhead    bench/step_overhead.py: host share of a step, tiny model, batch 1 and 64
#   throughput  bench/throughput.py --roofline: against transformers, and batch-1 decode
#               beside the HBM roofline, for each preset
#   prefix      bench/prefix.py parts a,c (host tier) on the 8B shape: TTFT cache on/off
#   lora        bench/lora.py on the 8B shape: 8 rank-16 adapters mixed over the base model
#   deepseek    bench/deepseek_gpu_check.py: latent attention and MTP against transformers
#   multimodal  bench/multimodal.py: image cache TTFT, batched encoder
#   pd          bench/pd.py on the 8B shape, one GPU per engine (needs two GPUs)
# Usage: bench/gpu_suite.sh OUT_DIR [PRESET ...]; PARTS=check,overhead,... picks parts
# (default: the first four; the others by name).
set -euo pipefail
out=${1:-bench/results}; shift || true
presets=${*:-llama-3.2-1b llama-3.1-8b}
parts=${PARTS:-check,overhead,throughput,prefix}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
quiet() { grep -v -E "Warning|warn|Loading|Writing" || true; }
if [[ $parts == *check* ]]; then
  python3 bench/gpu_check.py 2>&1 | quiet | tee "$out/gpu_check.txt"
fi
if [[ $parts == *overhead* ]]; then
  python3 bench/step_overhead.py --device cuda --dtype bfloat16 \
    --json "$out/step_overhead-cuda.json" 2>&1 | quiet
fi
if [[ $parts == *throughput* ]]; then
  for preset in $presets; do
    python3 bench/throughput.py --device cuda --preset "$preset" --roofline \
      --json "$out/throughput-$preset.json" 2>&1 | quiet
    # Our engine alone with a 512-token step budget: every step fits a captured graph.
    python3 bench/throughput.py --device cuda --preset "$preset" --skip-reference \
      --max-num-batched-tokens 512 --json "$out/throughput-$preset-budget512.json" 2>&1 | quiet
  done
fi
if [[ $parts == *prefix* ]]; then
  python3 bench/prefix.py --device cuda --dtype bfloat16 --preset llama-3.1-8b --parts a,c \
    --tiers host --json "$out/prefix-h200-8b.json" 2>&1 | quiet
fi
if [[ $parts == *lora* ]]; then
  python3 bench/lora.py --device cuda --preset llama-3.1-8b --json "$out/lora-h200-8b.json" 2>&1 | quiet
fi
if [[ $parts == *deepseek* ]]; then
  python3 bench/deepseek_gpu_check.py 2>&1 | quiet | tee "$out/deepseek_gpu_check.txt"
fi
if [[ $parts == *multimodal* ]]; then
  python3 bench/multimodal.py --device cuda --dtype bfloat16 --json "$out/multimodal-h200.json" 2>&1 | quiet
fi
if [[ $parts == *pd* ]]; then
  python3 bench/pd.py --device cuda --preset llama-3.1-8b --json "$out/pd-h200-8b.json" 2>&1 | quiet
fi
