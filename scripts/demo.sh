#!/usr/bin/env bash
# `make demo`: mine the sample WARCs (offline: their images are inside them), write triplets with the
# template writer, train the tiny model for a few steps and evaluate it. Outputs go to demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${DEMO_OUT:-demo-out}
rm -rf "$OUT"

echo "== mine: data/sample/*.warc.gz -> $OUT/mined"
# The sample crawls (2008, 2012) hold small images: a 64 px floor instead of the default 150.
$BIN/magiclens mine --input 'data/sample/*.warc.gz' --output "$OUT/mined" --no-fetch --min-side 64

echo
echo "== instruct (template writer): $OUT/mined/pairs -> $OUT/instructed"
$BIN/magiclens instruct --pairs "$OUT/mined/pairs" --writer template --output "$OUT/instructed"

echo
echo "== train (tiny model, a few steps on CPU): -> $OUT/checkpoint"
$BIN/magiclens train --data "$OUT/instructed/triplets/*.parquet" --model tiny --steps 20 --batch-size 8 --num-workers 2 \
  --output "$OUT/checkpoint"

echo
echo "== evaluate: $OUT/checkpoint on the demo triplets"
$BIN/magiclens evaluate --checkpoint "$OUT/checkpoint" --data "$OUT/instructed/triplets/*.parquet" --json

echo
echo "outputs:"
echo "  pairs     $OUT/mined/pairs/          stats $OUT/mined/stats.json   rejects $OUT/mined/rejects/"
echo "  triplets  $OUT/instructed/triplets/  stats $OUT/instructed/stats.json"
echo "  model     $OUT/checkpoint/"
