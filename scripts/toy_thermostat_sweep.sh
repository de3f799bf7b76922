#!/bin/bash
# Candidate settings of the demo's thermostat arm, measured on training-split problems only (docs/demo.md):
# continued RL from the collapsed checkpoint with the demo's continued-stage settings and the thermostat on,
# validation off (it samples test problems), then scripts/toy_families.py --split train.
#   scripts/toy_thermostat_sweep.sh COLLAPSED OUT STEPS NAME "thermostat.x=v thermostat.y=w ..." [NAME "..."]...
set -e
COLL=$1; OUT=$2; STEPS=$3; shift 3
T="tsopsd"; command -v tsopsd >/dev/null || T="python -m tsopsd_cli"
mkdir -p "$OUT"
while [ $# -ge 2 ]; do
  NAME=$1; SETS=$2; shift 2
  [ -d "$OUT/$NAME" ] && continue
  ARGS=(); for s in $SETS; do ARGS+=(--set "$s"); done
  s0=$(date +%s.%N)
  $T rl "$COLL" --recipe recipes/rl/toy.yaml --set train.max_steps=$STEPS --set train.prompts_per_step=16 \
    --set train.save_every=0 --set train.eval_every=0 --set validation.enabled=false --set thermostat.enabled=true \
    "${ARGS[@]}" --out "$OUT/$NAME" --json > "$OUT/$NAME.json" 2> "$OUT/$NAME.err"
  echo "$NAME wall $(echo "$(date +%s.%N) - $s0" | bc) s" >> "$OUT/walls.txt"
  python scripts/toy_families.py "$OUT/$NAME" --split train --json > "$OUT/$NAME.families.json"
done
