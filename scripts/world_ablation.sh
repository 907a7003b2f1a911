#!/usr/bin/env bash
# The embedded world's ablation (docs/ravel.md, "Why the default world is not the real one"):
# DAS alone on three model seeds, for the real nested facts and for attributes drawn apart
# from the country, each on every country (139) and on the 48 most populous.
# 12 jobs, each training its model first: ~1 h on 2 idle CPU cores with a fresh cache.
# Usage: bash scripts/world_ablation.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/readme}/world_ablation"
python run.py -m eval.method=das sae=none model.train_seed=0,1,2 \
  model.independent_attributes=false,true model.n_countries=null,48 hydra.sweep.dir="$out"
python scripts/readme_tables.py "$out"
