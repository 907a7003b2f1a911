#!/usr/bin/env bash
# Regenerate the RAVEL numbers of the README and docs/ravel.md (tables printed by
# scripts/readme_tables.py, which reads the results with saeravel.report):
#   1. the default job on three embedded models (model.train_seed=0,1,2; eval seed 0): per
#      model seed, every method's scores and the paired differences, then the pooled verdict;
#   2. with PLANTED=1, every method on the planted world, one job per basis (full size: slow).
# ~25 min on 2 idle CPU cores with a fresh cache (each model ~3 min, each job ~5 min).
# Usage: bash scripts/readme_numbers.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/readme}"
python run.py -m model.train_seed=0,1,2 hydra.sweep.dir="$out/embedded_model_seeds"
python scripts/readme_tables.py "$out/embedded_model_seeds"
if [ "${PLANTED:-0}" = 1 ]; then
  python run.py -m model=planted-city-lm sae=planted model.basis=aligned,rotated,mixed \
    hydra.sweep.dir="$out/planted"
  python scripts/readme_tables.py "$out/planted"
fi
