#!/usr/bin/env bash
# The one-call GPU run of issue 30 (docs/benchmarks.md "The one-call GPU run"), on the lent machine from the
# repository's root, with .whl/ and .gpu-data/ carried (benchmarks/gpu_prepare.sh makes them):
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl", ".gpu-data"], timeout_s=600)
# Installs the wheels (pip install --no-deps --target, FIELD-NOTES "On the lent GPU"), then within 10 minutes:
#   1. benchmarks/gpu_check.py, every arm (the issue-30 line last): <= 330 s, no arm started after 250 s;
#   2. benchmarks/real_shape_vs_trl.py --device cuda: TRL's GKDTrainer/GRPOTrainer vs reheat/rl, 1.7B, 28 layers;
#   3. benchmarks/gpu_check.py --cli: the user's torchrun command (0.6B, 8 prompts x 4 x 512 tokens, 2 steps).
# Everything it prints goes to $OUT (gpu_check.log/.json, real_shape.log, cli.log/.json, env.txt, summary.txt).
# GPU_RUN_SMOKE=1: the same calls with --smoke on the CPU (the script's plumbing, numbers meaningless).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/gpu-run}"
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - start) )); }  # seconds until $1 after the start
smoke=() device=cuda wheels=(.whl/*.whl)
if [ -n "${GPU_RUN_SMOKE:-}" ]; then  # (this Python may not be the GPU's 3.12: its pure-Python wheels only)
    smoke=(--smoke) device=cpu wheels=(.whl/*-py3-none-any.whl)
fi
site="${GPU_RUN_SITE:-/tmp/site}"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
    || { echo "gpu_run: the carried wheels did not install (is .whl/ carried?)"; exit 1; }
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)"
    git log -1 --format='commit %H' 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== gpu_check (every arm)"
timeout 330 python3 benchmarks/gpu_check.py "${smoke[@]}" --deadline 250 --json "$OUT/gpu_check.json" 2>&1 \
    | tee "$OUT/gpu_check.log"
echo "== real_shape_vs_trl --device $device ($(left 470) s left for it)"
timeout "$(left 470)" python3 benchmarks/real_shape_vs_trl.py "${smoke[@]}" --device "$device" --only reheat,rl \
    --steps 1 --data-dir .gpu-data 2>&1 | tee "$OUT/real_shape.log"
echo "== gpu_check --cli ($(left 590) s left for it)"
timeout "$(left 590)" python3 benchmarks/gpu_check.py "${smoke[@]}" --cli --cli-timeout "$(( $(left 590) - 15 ))" \
    --json "$OUT/cli.json" 2>&1 | tee "$OUT/cli.log"

{
    echo "gpu_check: $(tail -n 1 "$OUT/gpu_check.log")"
    echo "real_shape_vs_trl: $(tail -n 1 "$OUT/real_shape.log")"
    echo "cli: $(grep -m1 '^exit code' "$OUT/cli.log" || echo 'no exit code (timed out?)')"
    echo "total $(( $(date +%s) - start )) s"
} | tee "$OUT/summary.txt"
