#!/usr/bin/env bash
# The LoRA-SB chain on the bundled MiniLM-L6 encoder and the built-in Reuters R8 topics (run by
# `make demo-classify`): the classifier head is trained beside R and is part of the adapter and the merge.
# Usage: bash examples/demo_classify.sh [OUT_DIR]   (all outputs under OUT_DIR, default demo/)
set -euo pipefail
OUT=${1:-demo}
LORASB=${LORASB:-.venv/bin/lorasb}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
start=$(date +%s)

$LORASB estimate --model minilm-l6 --data reuters-r8 --format classification --samples 32 --max-length 128 \
  -o "$OUT/minilm-update.safetensors"
$LORASB decompose "$OUT/minilm-update.safetensors" --rank 16 -o "$OUT/minilm-factors.safetensors"
$LORASB train --model minilm-l6 --factors "$OUT/minilm-factors.safetensors" --data reuters-r8 --size 2000 \
  --max-steps 250 --batch-size 16 --lr 5e-3 --warmup-ratio 0.05 --max-length 128 --overwrite -o "$OUT/minilm-run"
$LORASB merge --adapter "$OUT/minilm-run" --overwrite -o "$OUT/minilm-merged"
# Before training: the encoder with the head the update was estimated with (a factors file is an untrained adapter).
$LORASB evaluate --model minilm-l6 --adapter "$OUT/minilm-factors.safetensors" --task classification \
  --data reuters-r8 --split test --limit 500 --max-length 128 --batch-size 32 -o "$OUT/minilm-base-accuracy.json"
$LORASB evaluate --model "$OUT/minilm-merged" --task classification --data reuters-r8 --split test --limit 500 \
  --max-length 128 --batch-size 32 -o "$OUT/minilm-lorasb-accuracy.json"

.venv/bin/python examples/demo_table.py "$OUT" $(( $(date +%s) - start ))
