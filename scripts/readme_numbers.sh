#!/usr/bin/env bash
# Regenerate the README's RAVEL numbers (tables printed by scripts/readme_tables.py):
#   1. the default job with three eval seeds on the embedded model (model.train_seed=0);
#   2. the default job on two more embedded models (model.train_seed=1,2);
#   3. every method on the planted world, one job per basis.
# ~1 h on 2 idle CPU cores with a fresh cache. Usage: bash scripts/readme_numbers.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/readme}"
python run.py -m seed=0,1,2 hydra.sweep.dir="$out/embedded_eval_seeds"
python run.py -m model.train_seed=1,2 hydra.sweep.dir="$out/embedded_model_seeds"
python run.py -m model=planted-city-lm sae=planted model.basis=aligned,rotated,mixed \
  hydra.sweep.dir="$out/planted"
python scripts/readme_tables.py "$out/embedded_eval_seeds"
python scripts/readme_tables.py "$out/embedded_eval_seeds/0_seed=0" "$out/embedded_model_seeds"  # model seeds 0, 1, 2
python scripts/readme_tables.py "$out/planted"
