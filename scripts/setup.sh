#!/usr/bin/env bash
# Install saeravel and its dependencies into the current Python (CPU torch first, so no
# multi-GB CUDA build is pulled in). Safe to run again: already-installed packages are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
