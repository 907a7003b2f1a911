#!/usr/bin/env bash
# The paper's grid on GPT-2 small (54 jobs): it is not rectangular, so it is three multiruns,
#   experiment=paper_grid            SAE masks, OpenAI v5 32k and Joseph Bloom's SAEs, layers 0..11
#   experiment=paper_grid_baselines  DAS and neuron masks (no SAE), layers 0..11
#   experiment=paper_grid_apollo     Apollo e2e / e2e+ds SAEs, layers 1, 5, 9 (needs WANDB_API_KEY)
# then one report over all of them.
#   launchers/paper_grid.sh                  # jobs one after another in this process
#   launchers/paper_grid.sh slurm [k=v ...]  # SLURM job arrays; extra args are Hydra overrides
#   PARTS="paper_grid paper_grid_baselines" launchers/paper_grid.sh slurm   # some parts only
# Needs the models and SAEs from the Hugging Face hub (or its local cache) and wandb for Apollo.
# Output: $GRID_DIR (default outputs/grids/paper_grid): one folder per part, then report/.
# Rerunning the same command resumes: finished jobs are skipped, their result.json kept.
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/common.sh
set_mode "${1:-basic}"
status=0
for part in ${PARTS:-paper_grid paper_grid_baselines paper_grid_apollo}; do
  # One failed part (e.g. no wandb key for Apollo) does not stop the others.
  run_grid "$part" "${@:2}" || { status=$?; echo "launchers: $part failed (exit $status)" >&2; }
done
make_report
exit $status
