#!/usr/bin/env bash
# Re-runnable recipe for the persona adapters shipped in adapters/<persona>/.
#   1. the base model answers template prompts (greedy); each answer is rewritten in every persona's
#      voice -> adapters/data/<persona>.jsonl (deterministic: same data on every machine)
#   2. one QLoRA adapter per persona on the NF4 base -> adapters/<persona>/
#   3. style scores of base + adapters on held-out prompts -> bench/results/personas.json
# Usage: adapters/recipe.sh [persona ...]   (default: all four). Env: STEPS, RANK, PROMPTS, PY.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-200}
THREADS=${THREADS:-}
RANK=${RANK:-8}
PROMPTS=${PROMPTS:-320}
PERSONAS=("$@")
[ ${#PERSONAS[@]} -eq 0 ] && PERSONAS=(pirate shakespeare robot fan)

if [ ! -s adapters/data/pirate.jsonl ]; then
  "$PY" -m server build-persona-data --out adapters/data --prompts "$PROMPTS"
fi
for p in "${PERSONAS[@]}"; do
  "$PY" -m server train --data "adapters/data/$p.jsonl" --out "adapters/$p" \
    --rank "$RANK" --alpha $((2 * RANK)) --steps "$STEPS" --lr 1e-3 --batch-size 4 --max-len 160 --seed 0 --save-dtype bfloat16 ${THREADS:+--threads "$THREADS"}
done
"$PY" -m server eval-personas --adapters-dir adapters --out bench/results/personas.json
