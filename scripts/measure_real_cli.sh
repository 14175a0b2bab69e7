#!/usr/bin/env bash
# The improve half on SmolLM2-135M-Instruct from the command line (docs/real-models.md, "From the CLI"):
# refusal direction + evaluation, ROME with automatic neighbourhood checks at two layers, and `eval run`
# with a user task file. Every number in that section comes from the logs this script writes.
# Usage: scripts/measure_real_cli.sh [OUT]   (heavy: ~15 min on 2 shared cores; run under the heavy lock)
set -euo pipefail
OUT=${1:-real-cli}
M=smollm2-135m-instruct
MS=${MS:-.venv/bin/mechscope}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MECHSCOPE_OUT="$OUT"
mkdir -p "$OUT"
run() {  # run NAME CMD...: log the command, its output and its wall time
  local name=$1; shift
  { echo "\$ $*"; } > "$OUT/$name.log"
  local t0; t0=$(date +%s.%N)
  "$@" >> "$OUT/$name.log" 2>&1
  echo "wall $(echo "$(date +%s.%N) - $t0" | bc) s" >> "$OUT/$name.log"
}
run refusal_direction $MS steer direction $M --contrast refusal --n-prompts 32 --layers 6,10,14,18,22 \
  --positions -1 --max-kl 0.5 --induction prefer -o "$OUT/refusal_direction.safetensors" \
  --selection-out "$OUT/refusal_selection.safetensors"
run refusal_eval $MS eval run $M --task refusal --direction "$OUT/refusal_direction.safetensors" \
  -o "$OUT/refusal_eval.safetensors" --figure "$OUT/refusal_eval.html"
for L in 4 14; do
  run rome_L$L $MS edit rome $M --prompt "The capital of {} is" --subject Germany --target " Rome" \
    --layer $L --stats-tokens 10000 --record "$OUT/rome_L$L.safetensors"
done
for L in 14 4; do
  run capitals_eval_L$L $MS eval run $M --task docs/examples/capitals.jsonl --edit "$OUT/rome_L$L.safetensors" \
    -o "$OUT/capitals_eval_L$L.safetensors"
done
