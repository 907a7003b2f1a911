#!/usr/bin/env bash
# The embedded grid (conf/experiment/embedded_grid.yaml: tiny-city-lm, layers 0 and 1, methods
# das / neurons / sae with a trained SAE; 6 jobs), then the report.
#   launchers/embedded_grid.sh                  # jobs one after another in this process
#   launchers/embedded_grid.sh local            # each job in its own process (submitit_local)
#   launchers/embedded_grid.sh slurm [k=v ...]  # a SLURM job array; extra args are Hydra overrides
# Output: $GRID_DIR (default outputs/grids/embedded_grid): job folders, then report/.
# Rerunning the same command resumes: finished jobs are skipped, their result.json kept.
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/common.sh
set_mode "${1:-basic}"
status=0
run_grid embedded_grid "${@:2}" || status=$?
make_report   # also after a failure: the jobs that finished are reported
exit $status
