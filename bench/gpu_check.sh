#!/usr/bin/env bash
# Every GPU measurement of the trainer in one prepared run (the GPU issue): about 10 minutes on one
# H200. Run from the repository root on the GPU machine, after `make .venv/.installed` (or with
# PY pointing at a Python that has the package installed):
#
#   bash bench/gpu_check.sh gpu-out
#
# 1. bench/train_gpu.py --model base at batch 256 and 512, eager and compiled: triplets/s and MFU,
#    synthetic and from Parquet shards through the real loader (14 loader workers for 16 cores);
# 2. evaluate on a small triplet set (the sample WARCs, mined and instructed here) in float32 and
#    in bf16, with a base model trained one step from random weights: the metric difference;
# 3. one optimizer step of `large` at batch 64 (step_seconds and peak_memory_gib in its JSON).
set -euo pipefail
OUT=${1:-gpu-out}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

$PY bench/train_gpu.py --model base --batch-sizes 256 512 --modes eager compiled --num-workers 14 \
    --output "$OUT/train_gpu_base.json"

$PY -m magiclens mine --input 'data/sample/*.warc.gz' --output "$OUT/mined" --no-fetch --min-side 64 --overwrite
$PY -m magiclens instruct --pairs "$OUT/mined" --writer template --output "$OUT/instructed" --overwrite
$PY -m magiclens train --data "$OUT/instructed/triplets/*.parquet" --model base --steps 1 --batch-size 4 \
    --num-workers 2 --output "$OUT/base-checkpoint"
for precision in fp32 bf16; do
  $PY -m magiclens evaluate --checkpoint "$OUT/base-checkpoint" --data "$OUT/instructed/triplets/*.parquet" \
      --precision "$precision" --json | tee "$OUT/evaluate-$precision.json"
done

$PY bench/train_gpu.py --model large --batch-sizes 64 --modes eager --steps 1 --warmup-steps 1 --num-workers 14 \
    --triplets 512 --output "$OUT/train_gpu_large.json"   # step_seconds and peak_memory_gib per row
echo "results in $OUT/"
