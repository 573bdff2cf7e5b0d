#!/usr/bin/env bash
# LoRA-SB on the GPUs of one machine: a data-parallel estimate, one SVD, and data-parallel (DDP) training of R,
# launched with torchrun and with accelerate. Only global rank 0 writes files and prints the path on stdout, so
# each launch chains like a single process.
#
#   bash examples/multi_gpu.sh                                    # Mistral-7B on data.jsonl, every GPU
#   NPROC=4 MODEL=./my-model DATA=train.jsonl OUT=runs bash examples/multi_gpu.sh
#
# The step's batch is NPROC × BATCH samples (BATCH per process). tests/test_distributed.py runs this script on
# two CPU processes (gloo) with a tiny model and compares every result with one process at the doubled batch.
# Across machines without a shared job: `estimate --raw --shard i/N` on each, then `lorasb combine` (README).
set -euo pipefail
trap 'echo "multi_gpu.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR

MODEL=${MODEL:-mistral}
DATA=${DATA:-data.jsonl}
OUT=${OUT:-multi-gpu}
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
PORT=${PORT:-29500}            # rendezvous port of the first launch; the others take the next ones
SAMPLES=${SAMPLES:-64}         # estimate: samples of G, split across the processes
RANK_R=${RANK_R:-32}           # LoRA-SB rank r
LORA_RANK=${LORA_RANK:-8}      # the PEFT LoRA baseline's rank
BATCH=${BATCH:-8}
STEPS=${STEPS:-1000}
LR=${LR:-1e-3}
DTYPE=${DTYPE:-auto}
read -r -a TRAIN_ARGS <<< "${TRAIN_ARGS:-}"   # more train options, e.g. "--scheduler cosine --save-steps 200"
mkdir -p "$OUT"

# 1. G over the sample, each process summing its part; the parts are all-reduced into one update.
UPDATE=$(torchrun --nproc-per-node "$NPROC" --master-port "$PORT" -m lorasb_cli estimate \
  -m "$MODEL" -d "$DATA" --samples "$SAMPLES" --dtype "$DTYPE" -q -o "$OUT/update.safetensors")
# 2. The SVD needs one process.
FACTORS=$(lorasb decompose "$UPDATE" --rank "$RANK_R" -q -o "$OUT/factors.safetensors")

# 3. DDP training of R, with torchrun ...
TRAIN=(-m "$MODEL" -d "$DATA" --batch-size "$BATCH" --max-steps "$STEPS" --lr "$LR" --dtype "$DTYPE"
  "${TRAIN_ARGS[@]}" -q --overwrite)
RUN=$(torchrun --nproc-per-node "$NPROC" --master-port $((PORT + 1)) -m lorasb_cli train \
  -f "$FACTORS" "${TRAIN[@]}" -o "$OUT/lorasb-torchrun")
# ... or with accelerate launch (the same DDP through accelerate's launcher).
RUN_ACCELERATE=$(accelerate launch --multi_gpu --num_processes "$NPROC" --main_process_port $((PORT + 2)) \
  -m lorasb_cli train -f "$FACTORS" "${TRAIN[@]}" -o "$OUT/lorasb-accelerate")

# 4. A PEFT method trains the same way: the LoRA baseline.
RUN_LORA=$(torchrun --nproc-per-node "$NPROC" --master-port $((PORT + 3)) -m lorasb_cli train \
  --method lora --rank "$LORA_RANK" "${TRAIN[@]}" -o "$OUT/lora-torchrun")

printf '%s\n' "$UPDATE" "$FACTORS" "$RUN" "$RUN_ACCELERATE" "$RUN_LORA"
