#!/usr/bin/env bash
# A real one-node SLURM cluster on 127.0.0.1, for trying sweeps and for the `slurm` tests.
#
#   scripts/slurm_local.sh install   # Debian packages (slurm-wlm 22.05, munge, slurmdbd, mariadb)
#   scripts/slurm_local.sh start     # munged, mariadb, slurmdbd, slurmctld, slurmd
#   scripts/slurm_local.sh status    # which daemons run; sinfo
#   scripts/slurm_local.sh stop      # stops every daemon this script started, by its pid
#
# Everything (configs, keys, spool, database, logs, pid files) lives under one state folder:
# $SAERAVEL_SLURM_DIR, default /tmp/saeravel-slurm. Clients find the cluster through
# SLURM_CONF=<state>/etc/slurm.conf; `start` also links /etc/slurm/slurm.conf to it when that
# file does not exist yet (and `stop` removes the link again), so plain `sinfo` works.
# Accounting (slurmdbd + mariadb) is on because submitit needs `sacct` to notice a job that
# died without writing its result; without it submitit waits forever on such a job.
# Every subcommand is idempotent: `start` twice leaves one cluster, `stop` twice is harmless.
set -euo pipefail

STATE=${SAERAVEL_SLURM_DIR:-/tmp/saeravel-slurm}
CLUSTER=${SAERAVEL_SLURM_CLUSTER:-saeravel}
PARTITION=${SAERAVEL_SLURM_PARTITION:-local}
CTLD_PORT=${SAERAVEL_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${SAERAVEL_SLURM_SLURMD_PORT:-16818}
DBD_PORT=${SAERAVEL_SLURM_DBD_PORT:-16819}
DB_PORT=${SAERAVEL_SLURM_DB_PORT:-16806}
DB_PASS=saeravel-local   # the database listens on 127.0.0.1 only and holds nothing but job records
NODE=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
ETC_LINK=/etc/slurm/slurm.conf

ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
MUNGE=$STATE/munge
DB=$STATE/mysql

say() { echo "slurm_local: $*" >&2; }
die() { say "error: $*"; exit 1; }

# ------------------------------------------------------------------ pid bookkeeping

# pid_alive NAME: true when <run>/NAME.pid names a live process whose command is NAME's binary.
pid_alive() {
  local file=$RUN/$1.pid pid comm
  [[ -s $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  case "$1" in
    mariadb) [[ $comm == mariadbd || $comm == mysqld ]] ;;
    *) [[ $comm == "$1" ]] ;;
  esac
}

# stop_daemon NAME: TERM the pid in <run>/NAME.pid, wait up to 20 s, then KILL.
stop_daemon() {
  local name=$1 pid
  if ! pid_alive "$name"; then
    rm -f "$RUN/$name.pid"
    return 0
  fi
  pid=$(tr -dc '0-9' <"$RUN/$name.pid")
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name did not stop in 20 s; killing pid $pid"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$name.pid"
}

# wait_for WHAT SECONDS COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
  local what=$1 secs=$2
  shift 2
  for _ in $(seq 1 $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up in ${secs}s (logs in $LOG)"
}

queue_empty() { [[ -z $(squeue -h -o %i 2>/dev/null) ]]; }

# wait_quietly SECONDS COMMAND...: like wait_for, but giving up is not an error.
wait_quietly() {
  local secs=$1
  shift
  for _ in $(seq 1 $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  return 0
}

# ------------------------------------------------------------------ install

cmd_install() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    say "already installed: ${PACKAGES[*]}"
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "install needs root (apt-get)"
  say "installing ${missing[*]}"
  apt-get update -qq
  # policy-rc.d exit 101: packages must not start their own daemons (we start ours by hand).
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || { ((made_policy)) && rm -f "$policy"; die "apt-get install failed"; }
  ((made_policy)) && rm -f "$policy"
  say "installed"
}

# ------------------------------------------------------------------ configuration

write_configs() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/spool/ctld" "$STATE/spool/d"
  cat >"$ETC/slurm.conf" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster on 127.0.0.1.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE/munge.socket
MinJobAge=300
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$ETC/slurmdbd.conf" <<EOF
# Written by scripts/slurm_local.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"
}

link_etc() {
  if [[ -L $ETC_LINK && $(readlink "$ETC_LINK") == "$ETC/slurm.conf" ]]; then return 0; fi
  if [[ -e $ETC_LINK || -L $ETC_LINK ]]; then
    say "$ETC_LINK exists and is not ours; use: export SLURM_CONF=$ETC/slurm.conf"
    return 0
  fi
  if ! { mkdir -p "$(dirname "$ETC_LINK")" && ln -s "$ETC/slurm.conf" "$ETC_LINK"; }; then
    say "could not link $ETC_LINK; use: export SLURM_CONF=$ETC/slurm.conf"
  fi
}

unlink_etc() {
  if [[ -L $ETC_LINK && $(readlink "$ETC_LINK") == "$ETC/slurm.conf" ]]; then rm -f "$ETC_LINK"; fi
}

# ------------------------------------------------------------------ daemons

start_munge() {
  pid_alive munged && return 0
  id munge >/dev/null 2>&1 || die "no munge user: run '$0 install' first"
  mkdir -p "$MUNGE"
  if [[ ! -s $MUNGE/munge.key ]]; then
    dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$MUNGE"
  chmod 755 "$MUNGE"   # clients of any user reach the socket; the key itself stays 0400
  chmod 400 "$MUNGE/munge.key"
  rm -f "$MUNGE/munge.socket" "$MUNGE/munge.socket.lock"
  touch "$RUN/munged.pid" "$LOG/munged.log"
  chown munge:munge "$RUN/munged.pid" "$LOG/munged.log"
  # --force: the state folder may sit under a world-writable /tmp, which munged distrusts.
  runuser -u munge -- munged --force --key-file="$MUNGE/munge.key" \
    --socket="$MUNGE/munge.socket" --pid-file="$RUN/munged.pid" \
    --log-file="$LOG/munged.log" --seed-file="$MUNGE/munged.seed" \
    || die "munged failed (see $LOG/munged.log)"
  wait_for munged 10 munge -S "$MUNGE/munge.socket" -n
}

mysql_root() { mariadb --socket="$DB/mysqld.sock" -uroot "$@"; }

start_mariadb() {
  if ! pid_alive mariadb; then
    id mysql >/dev/null 2>&1 || die "no mysql user: run '$0 install' first"
    mkdir -p "$DB"
    if [[ ! -d $DB/data/mysql ]]; then
      say "initialising the accounting database in $DB/data"
      mariadb-install-db --user=mysql --datadir="$DB/data" --auth-root-authentication-method=socket \
        --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    chown -R mysql:mysql "$DB"
    touch "$LOG/mariadb.log" && chown mysql:mysql "$LOG/mariadb.log"
    rm -f "$RUN/mariadb.pid"
    setsid nohup mariadbd --no-defaults --user=mysql --datadir="$DB/data" \
      --socket="$DB/mysqld.sock" --pid-file="$DB/mariadb.pid" --bind-address=127.0.0.1 \
      --port="$DB_PORT" --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=64M \
      --skip-name-resolve </dev/null >/dev/null 2>&1 &
    echo $! >"$RUN/mariadb.pid"
    wait_for mariadb 60 mysql_root -e "SELECT 1"
  fi
  mysql_root -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
  pid_alive slurmdbd && return 0
  # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF.
  slurmdbd || die "slurmdbd failed (see $LOG/slurmdbd.log)"
  wait_for slurmdbd 60 sacctmgr -n list cluster
}

start_slurmctld() {
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  pid_alive slurmctld && return 0
  slurmctld -f "$ETC/slurm.conf" || die "slurmctld failed (see $LOG/slurmctld.log)"
  wait_for slurmctld 30 scontrol ping
}

start_slurmd() {
  pid_alive slurmd && return 0
  slurmd -f "$ETC/slurm.conf" -N "$NODE" || die "slurmd failed (see $LOG/slurmd.log)"
}

node_ready() {
  local st
  st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null) || return 1
  case "$st" in
    idle* | mixed* | allocated* | completing*) return 0 ;;
    down* | drain* | fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}

cmd_start() {
  for c in munged slurmctld slurmd slurmdbd sinfo mariadbd; do
    command -v "$c" >/dev/null || die "$c not found: run '$0 install' first"
  done
  [[ $(id -u) == 0 ]] || die "start needs root (munged runs as munge, mariadb as mysql)"
  export SLURM_CONF=$ETC/slurm.conf
  local t0=$SECONDS
  if ! pid_alive slurmctld; then write_configs; fi
  link_etc
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  wait_for "node $NODE" 60 node_ready
  say "cluster '$CLUSTER' up in $((SECONDS - t0)) s: partition $PARTITION, node $NODE"
  say "clients: export SLURM_CONF=$SLURM_CONF"
}

cmd_stop() {
  # Reverse order; each by its own pid file, so nothing this script did not start is touched.
  export SLURM_CONF=$ETC/slurm.conf
  if pid_alive slurmctld; then
    # Jobs first: their processes (slurmstepd and below) would outlive slurmd.
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ') || true
    if [[ -n ${jobs// /} ]]; then
      say "cancelling jobs $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      wait_quietly 20 queue_empty
    fi
  fi
  stop_daemon slurmd
  stop_daemon slurmctld
  stop_daemon slurmdbd
  stop_daemon mariadb
  stop_daemon munged
  unlink_etc
  say "stopped (state kept in $STATE; delete it for a fresh cluster)"
}

cmd_status() {
  export SLURM_CONF=$ETC/slurm.conf
  local ok=0 name
  for name in munged mariadb slurmdbd slurmctld slurmd; do
    if pid_alive "$name"; then
      echo "$name: running (pid $(tr -dc '0-9' <"$RUN/$name.pid"))"
    else
      echo "$name: stopped"
      ok=1
    fi
  done
  if ((ok == 0)); then
    sinfo
    echo "export SLURM_CONF=$SLURM_CONF"
  fi
  return $ok
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 {install|start|stop|status}   (state in \$SAERAVEL_SLURM_DIR, default /tmp/saeravel-slurm)" >&2
    exit 2
    ;;
esac
