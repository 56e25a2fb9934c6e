# Shared by start.sh and stop.sh (sourced, not run): settings, paths and small process helpers.
#
# Settings (environment variables):
#   R2D2_SLURM_NODES    nodes node1..nodeN, each a slurmd in its own UTS + mount namespace with a share of the CPUs
#                       and memory (default 2); 1: one node named after this host, with all of them
#   R2D2_SLURM_GRACE_S  GraceTime of partition low: seconds between a preemption's SIGTERM and SIGKILL (30)
#   R2D2_SLURM_DIR      state root: pid files, logs, controller state, spool, MariaDB datadir (/tmp/r2d2-slurm)
#   R2D2_SLURM_DB_PORT  MariaDB's TCP port on 127.0.0.1 (6830: not 3306, so a system MariaDB/MySQL never clashes)
#   R2D2_SLURM_FRESH    1: a (re)started controller forgets old jobs, in its state AND in the accounting DB, so
#                       job ids restart at 1 and a new job N is never mistaken for an old one (default 1)
#   R2D2_SLURM_WAIT_S   seconds to wait for the node to become idle (default 60)
#   R2D2_SLURM_WARMUP   1: after starting a daemon, run one job and wait until sacct shows it COMPLETED (default 1)
#   R2D2_SLURM_FORCE    1: replace an /etc/slurm/slurm.conf or slurmdbd.conf that start.sh did not write (kept as
#                       *.orig); without it start.sh refuses to touch another Slurm setup
#   R2D2_SLURM_PURGE    stop.sh only: 1 also deletes the state root (logs, accounting DB)

R2D2_SLURM_DIR=${R2D2_SLURM_DIR:-/tmp/r2d2-slurm}
R2D2_SLURM_DB_PORT=${R2D2_SLURM_DB_PORT:-6830}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
# The first line of every file start.sh writes; a file without it belongs to someone else.
MARKER="# Written by r2d2_hpc slurm/local/start.sh (the local test cluster); edits are overwritten."
MYDIR=$R2D2_SLURM_DIR/mysql
MYCNF=$MYDIR/my.cnf
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$R2D2_SLURM_DIR/run/slurmctld.pid
# slurmd_pid NODE: the pid file of that node's slurmd (SlurmdPidFile=.../slurmd-%n.pid)
slurmd_pid() { echo "$R2D2_SLURM_DIR/run/slurmd-$1.pid"; }
# Every slurmd pid file, whatever node count wrote it (slurmd.pid: written by older versions of start.sh).
slurmd_pid_files() { compgen -G "$R2D2_SLURM_DIR/run/slurmd-*.pid" || true; compgen -G "$R2D2_SLURM_DIR/run/slurmd.pid" || true; }
DBD_PID=$R2D2_SLURM_DIR/run/slurmdbd.pid
MY_PID=$MYDIR/mysqld.pid
LOGDIR=$R2D2_SLURM_DIR/log
PORT_CTLD=6817
PORT_SLURMD=6818 # one node; with several, node i listens on PORT_SLURMD_BASE + i
PORT_SLURMD_BASE=7820
HOSTS_FILE=$R2D2_SLURM_DIR/hosts # bind-mounted over /etc/hosts inside each node: every node name resolves
PORT_DBD=6819

T0=$(date +%s.%N)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}'; }
log() { printf '[r2d2-slurm %s %6ss] %s\n' "$SCRIPT" "$(since "$T0")" "$*"; }
die() { printf '[r2d2-slurm %s] ERROR: %s\n' "$SCRIPT" "$*" >&2; exit 1; }

# alive PIDFILE NAME: the pid in PIDFILE is a live process called NAME. kill -0 is not enough: a killed daemon can
# linger as a zombie when PID 1 reaps lazily, and a stale pid file may name an unrelated process.
alive() {
  local pid st
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  st=$(ps -o stat=,comm= -p "$pid" 2>/dev/null) || return 1
  [ "${st:0:1}" != Z ] && [ "$(echo "$st" | awk '{print $2}')" = "$2" ]
}

# stop_pid PIDFILE NAME [SECONDS]: SIGTERM, wait up to SECONDS (10), then SIGKILL.
stop_pid() {
  local pf=$1 name=$2 n=$(( ${3:-10} * 10 )) pid
  alive "$pf" "$name" || { rm -f "$pf"; return 0; }
  pid=$(cat "$pf")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq "$n"); do alive "$pf" "$name" || break; sleep 0.1; done
  if alive "$pf" "$name"; then
    log "$name (pid $pid) ignored SIGTERM for ${3:-10} s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.3
  fi
  rm -f "$pf"
  log "stopped $name (pid $pid)"
}

# port_busy PORT: something accepts connections on 127.0.0.1:PORT (bash's /dev/tcp: no ss/netstat needed).
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# lock: one start.sh/stop.sh at a time per state root (parallel test sessions, a stop during a start).
lock() {
  mkdir -p "$LOGDIR"
  exec 9>"$R2D2_SLURM_DIR/.lock"
  flock -w 300 9 || die "another start.sh/stop.sh holds $R2D2_SLURM_DIR/.lock for more than 300 s"
}
