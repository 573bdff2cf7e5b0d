#!/usr/bin/env bash
# The LoRA-SB chain, offline, on the bundled SmolLM2-135M and the built-in `arithmetic` set (run by `make demo`):
#   estimate → decompose → train → merge → evaluate the base and the fine-tuned model under one template.
# Usage: bash examples/demo.sh [OUT_DIR]   (all outputs under OUT_DIR, default demo/)
# examples/demo_classify.sh (`make demo-classify`) is the same chain on MiniLM-L6 / Reuters R8.
set -euo pipefail
OUT=${1:-demo}
LORASB=${LORASB:-.venv/bin/lorasb}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
start=$(date +%s)

# 32 training rows' gradients → the simulated first step; its rank-32 SVD → frozen B, A and the initial R.
$LORASB estimate --model smollm2-135m --data arithmetic --samples 32 --batch-size 8 -o "$OUT/smollm2-update.safetensors"
$LORASB decompose "$OUT/smollm2-update.safetensors" --rank 32 -o "$OUT/smollm2-factors.safetensors"
# Train only R (215K parameters of 135M), then fold B·R·A into the weights.
$LORASB train --model smollm2-135m --factors "$OUT/smollm2-factors.safetensors" --data arithmetic \
  --max-steps 60 --batch-size 8 --lr 3e-3 --warmup-ratio 0.05 --max-length 128 --overwrite -o "$OUT/smollm2-run"
$LORASB merge --adapter "$OUT/smollm2-run" --overwrite -o "$OUT/smollm2-merged"
# Before and after under one template: the base is prompted exactly as the fine-tuned model is (--template-of).
for model in smollm2-135m "$OUT/smollm2-merged"; do
  name=$( [ "$model" = smollm2-135m ] && echo base || echo lorasb )
  $LORASB evaluate --model "$model" --template-of "$OUT/smollm2-merged" --task gsm8k --data arithmetic --split test \
    --limit 50 --batch-size 25 --max-new-tokens 12 -o "$OUT/smollm2-$name-accuracy.json"
done

.venv/bin/python examples/demo_table.py "$OUT" $(( $(date +%s) - start ))
