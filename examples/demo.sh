#!/usr/bin/env bash
# The whole LoRA-SB chain, offline, on the bundled real models and data (docs/design.md §7):
#   SmolLM2-135M on `arithmetic` and MiniLM-L6 on `reuters-r8`:
#   data → estimate → decompose → train → merge → evaluate base and fine-tuned.
# Usage: bash examples/demo.sh [OUT_DIR]   (run by `make demo`; all outputs under OUT_DIR, default demo/)
set -euo pipefail
OUT=${1:-demo}
LORASB=${LORASB:-.venv/bin/lorasb}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
start=$(date +%s)

echo "== SmolLM2-135M on arithmetic ==" >&2
$LORASB data arithmetic --split train --size 2000 -o "$OUT/arith-train.jsonl"
$LORASB data arithmetic --split test --size 200 -o "$OUT/arith-test.jsonl"
$LORASB estimate --model smollm2-135m --data "$OUT/arith-train.jsonl" --samples 32 --batch-size 8 \
  -o "$OUT/smollm2-update.safetensors"
$LORASB decompose "$OUT/smollm2-update.safetensors" --rank 32 -o "$OUT/smollm2-factors.safetensors"
$LORASB train --model smollm2-135m --factors "$OUT/smollm2-factors.safetensors" --data "$OUT/arith-train.jsonl" \
  --max-steps 150 --batch-size 8 --lr 2e-3 --warmup-ratio 0.05 --init-scale auto --max-length 128 \
  --overwrite -o "$OUT/smollm2-run"
$LORASB merge --adapter "$OUT/smollm2-run" --overwrite -o "$OUT/smollm2-merged"
# Before and after under one template: the base is prompted exactly as the fine-tuned model is (--template-of).
for model in smollm2-135m "$OUT/smollm2-merged"; do
  name=$( [ "$model" = smollm2-135m ] && echo base || echo lorasb )
  $LORASB evaluate --model "$model" --template-of "$OUT/smollm2-merged" --task gsm8k --data "$OUT/arith-test.jsonl" \
    --limit 100 --batch-size 25 --max-new-tokens 24 -o "$OUT/smollm2-$name-accuracy.json"
  $LORASB evaluate --model "$model" --template-of "$OUT/smollm2-merged" --task perplexity \
    --data "$OUT/arith-test.jsonl" --limit 100 -o "$OUT/smollm2-$name-loss.json"
done

echo "== MiniLM-L6 on reuters-r8 ==" >&2
$LORASB data reuters-r8 --split train --size 2000 -o "$OUT/reuters-train.jsonl"
$LORASB data reuters-r8 --split test --size 500 -o "$OUT/reuters-test.jsonl"
$LORASB estimate --model minilm-l6 --data "$OUT/reuters-train.jsonl" --format classification --samples 32 \
  --max-length 128 -o "$OUT/minilm-update.safetensors"
$LORASB decompose "$OUT/minilm-update.safetensors" --rank 16 -o "$OUT/minilm-factors.safetensors"
$LORASB train --model minilm-l6 --factors "$OUT/minilm-factors.safetensors" --data "$OUT/reuters-train.jsonl" \
  --max-steps 250 --batch-size 16 --lr 5e-3 --warmup-ratio 0.05 --max-length 128 --overwrite -o "$OUT/minilm-run"
$LORASB merge --adapter "$OUT/minilm-run" --overwrite -o "$OUT/minilm-merged"
# Before training: the encoder with the head the update was estimated with (a factors file is an untrained adapter).
$LORASB evaluate --model minilm-l6 --adapter "$OUT/minilm-factors.safetensors" --task classification \
  --data "$OUT/reuters-test.jsonl" --max-length 128 --batch-size 32 -o "$OUT/minilm-base-accuracy.json"
$LORASB evaluate --model "$OUT/minilm-merged" --task classification --data "$OUT/reuters-test.jsonl" \
  --max-length 128 --batch-size 32 -o "$OUT/minilm-lorasb-accuracy.json"

.venv/bin/python examples/demo_table.py "$OUT" $(( $(date +%s) - start ))
