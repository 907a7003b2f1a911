# shellcheck shell=bash
# Shared by launchers/*.sh (sourced, not run): run one experiment as a multirun, then the report.
# GRID_DIR   where job folders and the report go (default outputs/grids/<script name>)
# PYTHON     the interpreter (default python)

GRID_DIR=${GRID_DIR:-outputs/grids/$(basename "$0" .sh)}
PYTHON=${PYTHON:-python}
LAUNCHER=()

# set_mode MODE: the Hydra overrides of MODE (basic | local | slurm) in LAUNCHER; exit 2 if unknown.
set_mode() {
  case "$1" in
    basic) LAUNCHER=() ;;
    local) LAUNCHER=(hydra/launcher=local) ;;
    slurm)
      LAUNCHER=(hydra/launcher=slurm)
      # Site settings (partition, account, setup lines) from the git-ignored conf/local/site.yaml.
      if [[ -f conf/local/site.yaml ]]; then LAUNCHER+=(local=site); fi
      # The cluster of scripts/slurm_local.sh, when no other is configured.
      if [[ -z ${SLURM_CONF:-} && ! -e /etc/slurm/slurm.conf ]]; then
        local conf=${SAERAVEL_SLURM_DIR:-/tmp/saeravel-slurm}/etc/slurm.conf
        if [[ -f $conf ]]; then export SLURM_CONF=$conf; fi
      fi
      ;;
    *)
      echo "launchers: unknown mode '$1' (basic | local | slurm)" >&2
      exit 2
      ;;
  esac
  MODE=$1
}

# run_grid EXPERIMENT [OVERRIDES...]: one multirun into $GRID_DIR/EXPERIMENT.
run_grid() {
  local experiment=$1
  shift
  echo "launchers: experiment=$experiment ($MODE) -> $GRID_DIR/$experiment" >&2
  "$PYTHON" run.py -m "experiment=$experiment" "${LAUNCHER[@]}" \
    "hydra.sweep.dir=$GRID_DIR/$experiment" "$@"
}

# make_report: CSV, markdown and figures of everything under $GRID_DIR, in $GRID_DIR/report.
make_report() {
  if [[ -d $GRID_DIR ]]; then
    "$PYTHON" -m saeravel.report "$GRID_DIR" --out "$GRID_DIR/report"
  else
    echo "launchers: nothing to report ($GRID_DIR does not exist)" >&2
  fi
}
