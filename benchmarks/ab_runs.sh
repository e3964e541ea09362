#!/bin/bash
# usage: benchmarks/ab_runs.sh OLD_TREE NEW_TREE MANIFEST [REPS]
# Two checkouts of krasr-batch (e.g. `git worktree add /tmp/old c14b66e` and this one) run the same manifest
# at their defaults, interleaved REPS times (default 2), whole command; base model from the test cache.
# Prints each run's wall, in-process wall, model seconds, segments, mean batch and segments per replica.
set -euo pipefail
OLD=$1; NEW=$2; MAN=$(realpath "$3"); REPS=${4:-2}
M=${MODEL:-$HOME/.cache/krasr-batch-test/models/base}
export HF_HUB_OFFLINE=1
for i in $(seq 1 "$REPS"); do
  for side in old new; do
    if [ $side = old ]; then R=$OLD; else R=$NEW; fi
    OUT=${TMPDIR:-/tmp}/ab-$side
    s=$(date +%s.%N)
    (cd "$R" && PYTHONPATH=$R python -m krasr_batch run "$MAN" --model "$M" --out "$OUT" --overwrite --no-progress \
       > "$OUT.out" 2>&1)
    e=$(date +%s.%N)
    python - "$OUT" "$side" "$i" "$(echo "$e - $s" | bc)" <<'PY'
import json, sys
from collections import Counter
import pyarrow.dataset as ds
out, side, i, wall = sys.argv[1:]
d = json.load(open(f"{out}/run.json"))
t = ds.dataset(f"{out}/segments").to_table(columns=["batch_size", "worker"]).to_pylist()
print(f"{side} run {i}: wall {float(wall):.1f} s; in-process {d['wall_s']:.1f}; model_s {d['profile']['model_s']:.1f}; "
      f"segs {len(t)}; mean batch {sum(r['batch_size'] for r in t) / max(len(t), 1):.1f}; "
      f"by replica {sorted(Counter(r['worker'] for r in t).values())}")
PY
  done
done
