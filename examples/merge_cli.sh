#!/usr/bin/env bash
# Merging from the command line: `mergeprobe methods` and `mergeprobe merge`.
#
# First examples/sequential_runs.py trains three LoRA adapters (tasks "reverse",
# "sort_letters", "arithmetic"); their callbacks save them in one probe store. Any PEFT
# LoRA directories trained on the same base model work the same way. Then two of them
# are merged with TIES, and all three with Pico over TIES with per-adapter weights.
# Each output is a PEFT adapter directory (plus mergeprobe_merge.json, the merge
# report) that `PeftModel.from_pretrained(base_model, DIR)` loads.
#
# Run it:
#     bash examples/merge_cli.sh            # embedded SmolLM2-135M, 3 runs x 60 steps
#     bash examples/merge_cli.sh --quick    # a tiny random Llama, 3 runs x 8 steps
# Everything is written under --out DIR (default mergeprobe-merge-cli).
set -euo pipefail

QUICK=""
OUT="mergeprobe-merge-cli"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: bash examples/merge_cli.sh [--quick] [--out DIR]" >&2; exit 2 ;;
  esac
done
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python}"

# 1. Three adapters, saved by MergeProbeCallback into $OUT/probe-store/runs/<task>/adapter.
"$PYTHON" "$HERE/sequential_runs.py" --out "$OUT" $QUICK
RUNS="$OUT/probe-store/runs"

# 2. The merge methods and their parameters.
mergeprobe methods

# 3. TIES on two adapters: keep the top half of each update, elect signs, average what agrees.
mergeprobe merge "$RUNS/reverse/adapter" "$RUNS/arithmetic/adapter" --method ties --param density=0.5 \
  --out "$OUT/merged-ties" --overwrite

# 4. Pico over TIES on all three, weighting the first higher (base_params.* go to the base merger).
mergeprobe merge "$RUNS/reverse/adapter" "$RUNS/sort_letters/adapter" "$RUNS/arithmetic/adapter" \
  --method pico --param base=ties --param base_params.density=0.5 --weights 1.2,0.9,0.9 \
  --out "$OUT/merged-pico" --overwrite

ls "$OUT/merged-ties" "$OUT/merged-pico"
