#!/usr/bin/env bash
# Install saeravel and its dependencies into the current Python. torch goes first and
# explicitly: the CPU build (from PyTorch's CPU index) where no NVIDIA GPU is visible, the
# default CUDA build where one is, so `pip install -e .` never pulls a multi-GB CUDA build onto a
# CPU machine. SAERAVEL_TORCH=cpu|cuda overrides the detection. Safe to run again:
# already-installed packages are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
want="${SAERAVEL_TORCH:-}"
if [ -z "$want" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then want=cuda; else want=cpu; fi
fi
if [ "$(uname -s)" = Darwin ] && [ "$want" = cpu ]; then want=plain; fi  # macOS wheels are CPU-only
case "$want" in
  plain) python -m pip install -q "torch==${TORCH_VERSION}" ;;
  cpu) python -m pip install -q "torch==${TORCH_VERSION}+cpu" \
         --extra-index-url https://download.pytorch.org/whl/cpu ;;
  cuda) python -m pip install -q "torch==${TORCH_VERSION}" ;;
  *) echo "setup: SAERAVEL_TORCH=$want is not valid (cpu or cuda)" >&2; exit 2 ;;
esac
python -m pip install -q -e ".[dev]"
