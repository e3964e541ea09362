#!/bin/bash
# usage: benchmarks/demo_side_by_side.sh, with the old commit checked out at /tmp/old-1ead082 (git worktree add /tmp/old-1ead082 1ead082)
# The demo job, before (1ead082) and after, interleaved; base model; whole command wall time.
M=$HOME/.cache/krasr-batch-test/models/base
export HF_HUB_OFFLINE=1
for i in 1 2 3; do
  for side in old new; do
    if [ $side = old ]; then R=/tmp/old-1ead082; else R=/work/main; fi
    s=$(date +%s.%N)
    (cd $R && PYTHONPATH=$R python -m krasr_batch run --job jobs/demo.yaml --model $M --out /tmp/demo-$side --overwrite > /tmp/demo-$side.out 2> /tmp/demo-$side.err)
    e=$(date +%s.%N)
    echo "$side run $i: $(echo "$e - $s" | bc) s; stderr lines not ours: $(grep -v -c '^files \|^krasr-batch' /tmp/demo-$side.err)"
  done
done
