#!/bin/bash
# usage: benchmarks/engine_runs.sh MANIFEST REPS "ARGS A" "ARGS B" ...
# `krasr-batch run MANIFEST` with each set of extra arguments in turn (e.g. "" and "--engine ctranslate2
# --dtype int8"), interleaved REPS times, whole command; base model from the test cache (MODEL moves it).
# Prints each run's wall, model seconds, the engine run.json records, and WER/CER against the manifest's text.
set -uo pipefail
MAN=$(realpath "$1"); REPS=$2; shift 2
M=${MODEL:-$HOME/.cache/krasr-batch-test/models/base}
export HF_HUB_OFFLINE=1
for i in $(seq 1 "$REPS"); do
  n=0
  for args in "$@"; do
    n=$((n + 1)); OUT=${TMPDIR:-/tmp}/engine-run-$n
    s=$(date +%s.%N)
    # shellcheck disable=SC2086  # ARGS is a list of flags
    python -m krasr_batch run "$MAN" --model "$M" --out "$OUT" --overwrite --no-progress $args > "$OUT.log" 2>&1
    e=$(date +%s.%N)
    python -m krasr_batch eval "$OUT" --refs "$MAN" --by none --format json > "$OUT.eval" 2>/dev/null
    python - "$OUT" "$args" "$i" "$(echo "$e - $s" | bc)" <<'PY'
import json, sys
out, args, i, wall = sys.argv[1:]
d = json.load(open(f"{out}/run.json"))
ev = json.load(open(f"{out}.eval"))["overall"]
print(f"[{args or 'defaults'}] run {i}: wall {float(wall):.1f} s; model_s {d['profile']['model_s']:.1f}; "
      f"engine {d['engine']['chosen']}; WER {100 * ev['wer']:.2f} %; CER {100 * ev['cer']:.2f} %")
PY
  done
done
