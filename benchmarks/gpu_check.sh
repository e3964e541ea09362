#!/usr/bin/env bash
# The one GPU check, as one command from the repository root (see benchmarks/gpu_check.py):
#
#     bash benchmarks/gpu_check.sh [gpu_check.py arguments, e.g. --device cpu --quick]
#
# Carried beside the working tree (git-ignored): .whl/ (cp312 wheels: soundfile, cffi, pycparser, soxr,
# silero-vad trimmed to its sequence ONNX model) and .gpu/ (written by `python -m benchmarks.gpu_check
# prepare`: plan.json, 16 kHz WAVs, the original long recordings, a model's config and tokenizer files).
# Results go to $OUT (gpu_check.json, gpu_check.md, gpu_check.log, nvidia-smi.txt), written as they come.
#
# The wheels are cp312: they are installed (into /tmp/site, nothing downloaded) only where python3 is 3.12,
# as on the GPU machine; elsewhere (the CPU dry run on 3.11) the packages are expected to be installed.
set -u
OUT=${OUT:-out/gpu_check}
BUDGET_S=${BUDGET_S:-380}     # gpu_check.py skips what is left after this (with the reason in the JSON)
HARD_S=${HARD_S:-410}         # and is stopped here whatever it is doing; the JSON holds what was measured
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
t0=$(date +%s)
say() { echo "[gpu_check.sh +$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }

PYV=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$PYV" = "3.12" ] && ls .whl/*.whl >/dev/null 2>&1; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || say "wheel install failed (see the log); the sections that need them will say so"
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  say "python3 is $PYV: not installing the cp312 wheels; using the installed packages"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  head -20 "$OUT/nvidia-smi.txt"
else
  say "no nvidia-smi here"
fi
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  say "no C compiler on the PATH: torch.compile's Triton launchers may not build"
fi
say "python -m benchmarks.gpu_check --budget-s $BUDGET_S $* (hard stop at ${HARD_S}s)"
timeout -k 10 "$HARD_S" python3 -u -m benchmarks.gpu_check --data .gpu --out "$OUT" --budget-s "$BUDGET_S" "$@" \
  >>"$LOG" 2>&1
rc=$?
echo "================ the log's last lines"
grep -v -E "^\s*$" "$LOG" | tail -n 25 | cut -c1-300
say "gpu_check exit status $rc"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  printf '**Stopped at the hard limit (%ss)**: a section still "pending" or "running" above did not finish.\n' \
    "$HARD_S" >>"$OUT/gpu_check.md"
fi
if [ -f "$OUT/gpu_check.md" ]; then
  echo "================ gpu_check.md"
  cat "$OUT/gpu_check.md"
fi
exit "$rc"
