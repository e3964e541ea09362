#!/bin/bash
# The demo job, before and after, interleaved N times (default 3); base model; whole command wall time.
#   BEFORE=/tmp/old-1ead082 AFTER=<this checkout> N=5 benchmarks/demo_side_by_side.sh
# BEFORE: a checkout of the code before this work (git worktree add /tmp/old-1ead082 1ead082).
# Each line: wall seconds, exit status, and the lines on stderr that krasr-batch did not write.
M=${MODEL:-$HOME/.cache/krasr-batch-test/models/base}
BEFORE=${BEFORE:-/tmp/old-1ead082}
AFTER=${AFTER:-$(cd "$(dirname "$0")/.." && pwd)}
export HF_HUB_OFFLINE=1
for i in $(seq 1 "${N:-3}"); do
  for side in before after; do
    if [ $side = before ]; then R=$BEFORE; else R=$AFTER; fi
    s=$(date +%s.%N)
    (cd "$R" && PYTHONPATH=$R python -m krasr_batch run --job jobs/demo.yaml --model "$M" --out /tmp/demo-$side \
      --overwrite > /tmp/demo-$side.out 2> /tmp/demo-$side.err)
    rc=$?
    e=$(date +%s.%N)
    echo "$side run $i: $(echo "$e - $s" | bc) s rc=$rc; stderr lines not ours: $(grep -v -c '^files \|^krasr-batch' /tmp/demo-$side.err)"
  done
done
