#!/bin/bash
# Measure the toy world end to end with the shipped recipes (docs/toy.md): base, collapse, continued RL from the
# collapsed checkpoint on three seeds (16 prompts x 8 per step, as in the demo), per-family measurements.
# (The fairness check with balanced family weights: scripts/toy_balanced_check.py; docs/toy.md.)
#   scripts/toy_world_check.sh [OUT=runs/toy-check] [STEPS=100]
set -e
OUT=${1:-runs/toy-check}; STEPS=${2:-100}
T="tsopsd"; command -v tsopsd >/dev/null || T="python -m tsopsd_cli"
mkdir -p "$OUT"
t() { local s=$(date +%s.%N); "$@"; echo "wall $(echo "$(date +%s.%N) - $s" | bc) s: ${*:1:4}" >&2; }
t $T toy init --recipe recipes/toy/init.yaml --out "$OUT/base" --json > "$OUT/base.json"
t $T rl "$OUT/base" --recipe recipes/rl/toy.yaml --out "$OUT/rl" --json > "$OUT/rl.json"
for S in 0 1 2; do
  t $T rl "$OUT/rl" --recipe recipes/rl/toy.yaml --set train.max_steps=$STEPS --set train.prompts_per_step=16 \
    --set train.seed=$S --set train.eval_every=20 --set train.save_every=0 --out "$OUT/cont-$S" --json > "$OUT/cont-$S.json"
done
python scripts/toy_families.py "$OUT/rl" --split train --json > "$OUT/families-train.json"  # docs/reheat.md's baseline
python scripts/toy_families.py "$OUT/base" "$OUT/rl" "$OUT"/cont-{0,1,2} --json > "$OUT/families.json"
python scripts/toy_families.py "$OUT/base" "$OUT/rl" "$OUT"/cont-{0,1,2}
