#!/usr/bin/env bash
# Starts a real Slurm cluster with accounting on this machine, for the tests: munged, a private MariaDB, slurmdbd,
# slurmctld and R2D2_SLURM_NODES slurmd (default 2: node1, node2, each in its own UTS + mount namespace, so each
# is a different host whose /etc/hosts resolves every node name) from Debian 12 packages (installed when
# missing), all on 127.0.0.1, no systemd needed. Partitions: low (default, preemptible) and high (preempts low).
# Waits until every node is idle and `sacct` reports a finished warm-up job that ran on all of them.
#
# Idempotent: installs only missing packages, starts only daemons that are down, restarts those whose config
# changed, and returns in about a second when everything is already up. Needs root.
# Settings: see common.sh (R2D2_SLURM_DIR, R2D2_SLURM_DB_PORT, R2D2_SLURM_FRESH, ...). Stop with stop.sh.
set -euo pipefail
SCRIPT=start
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
R2D2_SLURM_FRESH=${R2D2_SLURM_FRESH:-1}
R2D2_SLURM_WAIT_S=${R2D2_SLURM_WAIT_S:-60}
R2D2_SLURM_WARMUP=${R2D2_SLURM_WARMUP:-1}
R2D2_SLURM_NODES=${R2D2_SLURM_NODES:-2}
R2D2_SLURM_GRACE_S=${R2D2_SLURM_GRACE_S:-30}
DB_NAME=slurm_acct_db
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server procps)
STARTED=0 # 1 once any daemon was (re)started: then the warm-up job proves the whole path again
TL=$T0
lap() { printf '[r2d2-slurm start] TIMING %-28s %6s s\n' "$1" "$(since "$TL")"; TL=$(date +%s.%N); }
sql() { mariadb --defaults-file="$MYCNF" -uroot -N -B "$@"; }
# spawn DAEMON ARGS...: start a daemon detached from our stdio and WITHOUT the lock's fd 9: a daemon that
# inherited it would hold the lock for as long as it runs.
spawn() { "$@" </dev/null >>"$LOGDIR/daemons.out" 2>&1 9>&-; }
# need_port PORT WHAT: die with a hint when another process already listens where WHAT must.
need_port() {
  local hint="stop that process (another Slurm or MariaDB?)"
  [ "$1" = "$R2D2_SLURM_DB_PORT" ] && hint="$hint or set R2D2_SLURM_DB_PORT to a free port"
  port_busy "$1" && die "127.0.0.1:$1 is taken by another process, so $2 cannot listen there: $hint"
  return 0
}

install_packages() {
  local need=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
  done
  [ ${#need[@]} -gt 0 ] || return 0
  command -v apt-get >/dev/null || die "missing packages ${need[*]} and no apt-get (this script expects Debian 12)"
  log "installing: ${need[*]}"
  # Package scripts must not start the system's own munge/MariaDB/Slurm services: deny them for the install.
  local guard=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && guard=1
  fi
  inst() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 \
      --no-install-recommends "${need[@]}" </dev/null > "$R2D2_SLURM_DIR/apt.log" 2>&1
  }
  # Refresh the package lists only when needed: never fetched, or stale (the install then fails).
  local ok=1
  if ! apt-cache show slurmdbd mariadb-server >/dev/null 2>&1 || ! inst; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >> "$R2D2_SLURM_DIR/apt.log" 2>&1 && inst || ok=0
  fi
  [ "$guard" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$ok" = 1 ] || { tail -20 "$R2D2_SLURM_DIR/apt.log" >&2; die "apt-get install ${need[*]} failed"; }
}

ensure_hostname() {
  NODE=$(hostname -s)
  if ! getent hosts "$NODE" >/dev/null; then
    log "hostname $NODE does not resolve: adding '127.0.0.1 $NODE' to /etc/hosts"
    echo "127.0.0.1 $NODE" >> /etc/hosts
  fi
}

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key --force
  fi
  # munged refuses a key that others can read or that its user does not own.
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  if alive "$MUNGE_PID" munged && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  spawn runuser -u munge -- /usr/sbin/munged || true
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munged does not work (see /var/log/munge/munged.log)"
  log "started munged (pid $(cat "$MUNGE_PID"))"
}

# render TEMPLATE: the marker line, then the template with its placeholders replaced on non-comment lines.
render() {
  echo "$MARKER"
  sed -e "/^[[:space:]]*#/!{s|@NODE@|$NODE|g; s|@DIR@|$R2D2_SLURM_DIR|g; s|@CPUS@|$CPUS|g; s|@HW@|$HW|g;" \
    -e "s|@MEM@|$MEM|g; s|@MEMPERCPU@|$MEM_PER_CPU|g; s|@DBPORT@|$R2D2_SLURM_DB_PORT|g; s|@DBPASS@|$DBPASS|g}" "$1"
}

# install_file DEST MODE CONTENT: writes DEST when its content differs; returns 0 when it did.
install_file() {
  if [ -f "$1" ] && [ "$3" = "$(cat "$1")" ]; then chmod "$2" "$1"; chown root:root "$1"; return 1; fi
  if [ -f "$1" ] && [ "$(head -1 "$1")" != "$MARKER" ] && [[ "$1" == /etc/* ]]; then
    [ "${R2D2_SLURM_FORCE:-0}" = 1 ] ||
      die "$1 was not written by this script (another Slurm setup?):" \
        "set R2D2_SLURM_FORCE=1 to replace it (the old one is kept as $1.orig)"
    cp -p "$1" "$1.orig"
    log "kept the previous $1 as $1.orig"
  fi
  (umask 077; printf '%s\n' "$3" > "$1.tmp")
  chmod "$2" "$1.tmp"
  chown root:root "$1.tmp"
  mv -f "$1.tmp" "$1"
}

write_configs() {
  local hw field
  hw=$(slurmd -C | head -1) # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105
  field() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  CPUS=$(field CPUs)
  HW="Boards=$(field Boards) SocketsPerBoard=$(field SocketsPerBoard) CoresPerSocket=$(field CoresPerSocket)"
  HW="$HW ThreadsPerCore=$(field ThreadsPerCore)"
  MEM=$(($(field RealMemory) * 95 / 100)) # at or above the real size, slurmd drains the node ("Low RealMemory")
  if [ "$R2D2_SLURM_NODES" = 1 ]; then
    NODES=("$NODE")
    NODE_CPUS=$CPUS NODE_MEM=$MEM
  else
    NODES=()
    for i in $(seq "$R2D2_SLURM_NODES"); do NODES+=("node$i"); done
    # A share each; more nodes than CPUs oversubscribe (each node still claims one CPU).
    NODE_CPUS=$((CPUS / R2D2_SLURM_NODES > 0 ? CPUS / R2D2_SLURM_NODES : 1))
    NODE_MEM=$((MEM / R2D2_SLURM_NODES))
  fi
  MEM_PER_CPU=$((NODE_MEM / NODE_CPUS))
  mkdir -p /etc/slurm "$R2D2_SLURM_DIR"/{state/ctld,run,log}
  for n in "${NODES[@]}"; do mkdir -p "$R2D2_SLURM_DIR/spool/$n"; done
  chmod 0755 "$R2D2_SLURM_DIR"
  install -d -o mysql -g mysql -m 0755 "$MYDIR"
  if [ ! -s "$MYDIR/slurm_db_pass" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=\n' > "$MYDIR/slurm_db_pass")
  fi
  DBPASS=$(cat "$MYDIR/slurm_db_pass")
  CONF_CHANGED=0 DBD_CONF_CHANGED=0 MY_CHANGED=0
  if install_file "$CONF" 0644 "$(render "$HERE/slurm.conf.in"; node_lines)"; then
    CONF_CHANGED=1
    log "wrote $CONF (nodes ${NODES[*]}: $NODE_CPUS CPU(s), RealMemory $NODE_MEM MiB each)"
  fi
  # Inside each node: this machine's /etc/hosts plus every node name (so the first host of a job's node list is
  # a working rendezvous address, as on a real cluster).
  local hosts
  hosts=$(grep -vE "^127\.0\.0\.1[[:space:]]+node[0-9]+([[:space:]]|$)" /etc/hosts; echo "127.0.0.1 ${NODES[*]}")
  HOSTS_CHANGED=0
  install_file "$HOSTS_FILE" 0644 "$hosts" && HOSTS_CHANGED=1
  install_file "$DBD_CONF" 0600 "$(render "$HERE/slurmdbd.conf.in")" && DBD_CONF_CHANGED=1 && log "wrote $DBD_CONF"
  install_file "$MYCNF" 0644 "$(render "$HERE/mariadb.cnf.in")" && MY_CHANGED=1 && log "wrote $MYCNF"
  CLUSTER=$(sed -n 's/^ClusterName=//p' "$CONF")
  PARTITION=$(sed -n 's/^PartitionName=\([^ ]*\).*Default=YES.*/\1/p' "$CONF" | head -1)
}

# node_lines: the NodeName and PartitionName lines of slurm.conf. One node keeps the machine's own name and
# hardware description; several each get a name, a port and a share of the CPUs and memory.
node_lines() {
  local i=0 n
  if [ "$R2D2_SLURM_NODES" = 1 ]; then
    echo "NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS $HW RealMemory=$MEM State=UNKNOWN"
  else
    # All on 127.0.0.1 with a port each: distinct loopback addresses break srun's I/O inside batch jobs.
    for n in "${NODES[@]}"; do
      i=$((i + 1))
      echo "NodeName=$n NodeAddr=127.0.0.1 NodeHostname=$n Port=$((PORT_SLURMD_BASE + i))" \
        "CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN"
    done
  fi
  echo "# low: the default, preemptible (SIGTERM, then SIGKILL after GraceTime); high: preempts low"
  echo "PartitionName=low Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE" \
    "GraceTime=$R2D2_SLURM_GRACE_S"
  echo "PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
}

# any_slurmd: some slurmd of this state root is alive.
any_slurmd() {
  local pf
  for pf in $(slurmd_pid_files); do alive "$pf" slurmd && return 0; done
  return 1
}

stop_slurmds() {
  local pf
  for pf in $(slurmd_pid_files); do stop_pid "$pf" slurmd; done
}

# restart_changed: daemons whose config changed stop here and start again below.
restart_changed() {
  if [ "$CONF_CHANGED" = 1 ] && { alive "$CTLD_PID" slurmctld || any_slurmd; }; then
    log "slurm.conf changed: restarting slurmd and slurmctld"
    stop_slurmds
    stop_pid "$CTLD_PID" slurmctld
  fi
  if [ "$HOSTS_CHANGED" = 1 ] && any_slurmd; then
    log "$HOSTS_FILE changed: restarting slurmd (each node sees the file it was started with)"
    stop_slurmds
  fi
  if alive "$CTLD_PID" slurmctld && ! timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    log "slurmctld (pid $(cat "$CTLD_PID")) does not answer: restarting it"
    stop_pid "$CTLD_PID" slurmctld 3
  fi
  if { [ "$MY_CHANGED" = 1 ] || [ "$DBD_CONF_CHANGED" = 1 ]; } && alive "$DBD_PID" slurmdbd; then
    log "slurmdbd.conf or my.cnf changed: restarting slurmdbd"
    stop_pid "$DBD_PID" slurmdbd
  fi
  if [ "$MY_CHANGED" = 1 ] && alive "$MY_PID" mariadbd; then
    log "my.cnf changed: restarting MariaDB"
    stop_pid "$MY_PID" mariadbd 60
  fi
}

start_mariadb() {
  if [ ! -d "$MYDIR/data/mysql" ]; then
    # First start: system tables; root@localhost authenticates as OS root over the socket, no password.
    rm -rf "$MYDIR/data"
    install -d -o mysql -g mysql -m 0750 "$MYDIR/data"
    mariadb-install-db --defaults-file="$MYCNF" --auth-root-authentication-method=socket --skip-test-db \
      > "$MYDIR/install-db.log" 2>&1 || { tail -20 "$MYDIR/install-db.log" >&2; die "mariadb-install-db failed"; }
    lap "mariadb-install-db"
  fi
  if alive "$MY_PID" mariadbd && mariadb-admin --defaults-file="$MYCNF" ping >/dev/null 2>&1; then return 0; fi
  stop_pid "$MY_PID" mariadbd 30
  need_port "$R2D2_SLURM_DB_PORT" MariaDB
  STARTED=1
  # mariadbd does not daemonise: detach it into its own session.
  spawn setsid -f /usr/sbin/mariadbd --defaults-file="$MYCNF"
  for _ in $(seq 300); do mariadb-admin --defaults-file="$MYCNF" ping >/dev/null 2>&1 && break; sleep 0.1; done
  mariadb-admin --defaults-file="$MYCNF" ping >/dev/null 2>&1 ||
    { tail -20 "$MYDIR/mysqld.err" >&2; die "MariaDB did not answer within 30 s"; }
  log "started MariaDB (pid $(cat "$MY_PID"), 127.0.0.1:$R2D2_SLURM_DB_PORT)"
}

prepare_db() {
  # A fresh controller reuses job ids from 1: the accounting DB must forget the old jobs with those ids, or
  # `sacct -j 1` answers with the old job 1 until the new one is recorded.
  if [ "$CTLD_START" = 1 ] && [ "$R2D2_SLURM_FRESH" = 1 ] &&
    [ -n "$(sql -e "SHOW DATABASES LIKE '$DB_NAME'")" ]; then
    stop_pid "$DBD_PID" slurmdbd
    sql -e "DROP DATABASE $DB_NAME"
    log "dropped the accounting database (R2D2_SLURM_FRESH=1)"
  fi
  # slurmdbd connects over TCP: with skip-name-resolve that is 'slurm'@'127.0.0.1', not @'localhost'.
  sql <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
GRANT ALL ON $DB_NAME.* TO 'slurm'@'127.0.0.1';
SQL
}

db_clusters() { timeout 5 sacctmgr -n -P show cluster format=cluster 2>/dev/null; }

start_slurmdbd() {
  local clusters=""
  if ! { alive "$DBD_PID" slurmdbd && clusters=$(db_clusters); }; then
    stop_pid "$DBD_PID" slurmdbd
    need_port "$PORT_DBD" slurmdbd
    STARTED=1
    spawn slurmdbd # creates its tables on the first start
    for _ in $(seq 300); do clusters=$(db_clusters) && break; sleep 0.1; done
    db_clusters >/dev/null || { tail -20 "$LOGDIR/slurmdbd.log" >&2; die "slurmdbd did not answer within 30 s"; }
    log "started slurmdbd (pid $(cat "$DBD_PID"))"
  fi
  # slurmctld would register its cluster by itself, but only after it is up; doing it first is deterministic.
  if ! printf '%s\n' "$clusters" | grep -qx "$CLUSTER"; then
    timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null
    log "registered cluster $CLUSTER in the accounting DB"
  fi
}

start_slurmctld() {
  alive "$CTLD_PID" slurmctld && return 0
  rm -f "$CTLD_PID"
  need_port "$PORT_CTLD" slurmctld
  local opts=(-i)
  if [ "$R2D2_SLURM_FRESH" = 1 ]; then
    rm -rf "$R2D2_SLURM_DIR/state/ctld"/*
    opts=(-c -i)
  fi
  STARTED=1
  spawn slurmctld "${opts[@]}"
  for _ in $(seq 100); do timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
  timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' ||
    { tail -20 "$LOGDIR/slurmctld.log" >&2; die "slurmctld did not answer within 10 s"; }
  log "started slurmctld (pid $(cat "$CTLD_PID"))"
}

# start_slurmd NODE PORT: one node's slurmd. With several nodes each runs in its own UTS namespace (hostname =
# node name: slurmd takes its node name from it, and so does every job step it starts) and mount namespace
# (/etc/hosts = $HOSTS_FILE). Job steps inherit both.
start_slurmd() {
  local node=$1 port=$2 pf
  pf=$(slurmd_pid "$node")
  alive "$pf" slurmd && return 0
  rm -f "$pf"
  need_port "$port" "slurmd of $node"
  STARTED=1
  if [ "$R2D2_SLURM_NODES" = 1 ]; then
    spawn slurmd -N "$node"
  else
    spawn unshare --uts --mount --propagation private bash -c \
      "hostname '$node' && mount --bind '$HOSTS_FILE' /etc/hosts && exec slurmd"
  fi
  for _ in $(seq 50); do alive "$pf" slurmd && break; sleep 0.1; done
  alive "$pf" slurmd || { tail -20 "$LOGDIR/slurmd-$node.log" >&2; die "slurmd of $node did not start"; }
  log "started slurmd of $node (pid $(cat "$pf"), 127.0.0.1:$port)"
}

start_slurmds() {
  local i=0 n
  if [ "$R2D2_SLURM_NODES" = 1 ]; then
    start_slurmd "$NODE" "$PORT_SLURMD"
    return
  fi
  for n in "${NODES[@]}"; do
    i=$((i + 1))
    start_slurmd "$n" $((PORT_SLURMD_BASE + i))
  done
}

wait_idle() {
  local states="" deadline=$(($(date +%s) + R2D2_SLURM_WAIT_S)) ready node state
  while [ "$(date +%s)" -lt "$deadline" ]; do
    # sinfo retries for ~9 s when slurmctld is unreachable: bound every call.
    states=$(timeout 5 sinfo -h -N -p low -o '%N %T' 2>/dev/null || true)
    ready=0
    for node in "${NODES[@]}"; do
      state=$(echo "$states" | awk -v n="$node" '$1 == n {print $2; exit}')
      case "$state" in
        idle | mixed | allocated | completing) ready=$((ready + 1)) ;;
        # left DOWN/DRAINED by an unclean stop: resume it once slurmd has registered
        *drain* | *down* | *fail*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
      esac
    done
    [ "$ready" = "${#NODES[@]}" ] && return 0
    sleep 0.2
  done
  scontrol show node >&2 || true
  tail -5 "$LOGDIR"/slurmd-*.log >&2
  die "nodes are not all idle after $R2D2_SLURM_WAIT_S s: $(echo "$states" | tr '\n' ' ')"
}

# warm_up: the first batch job after slurmctld starts waits ~3 s for a scheduling pass. Taking that wait here
# also proves the whole path (munge, slurmstepd, slurmctld -> slurmdbd -> MariaDB -> sacct) before any test.
# With several nodes the warm-up job spans all of them and checks, on each, that the host name is the node's name
# and that every node name resolves.
warm_up() {
  local jid st="" deadline check
  check="[ \"\$(hostname)\" = \"\$SLURMD_NODENAME\" ] && getent hosts ${NODES[*]} >/dev/null"
  jid=$(sbatch --parsable -J r2d2-warmup -N "${#NODES[@]}" --ntasks-per-node=1 -o "$LOGDIR/warmup.out" \
    -e "$LOGDIR/warmup.out" --wrap "srun --kill-on-bad-exit=1 bash -c '$check'")
  deadline=$(($(date +%s) + 30))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    st=$(sacct -n -X -P -j "$jid" -o State 2>/dev/null | head -1 || true)
    [ "$st" = COMPLETED ] && return 0
    sleep 0.1
  done
  scontrol show job "$jid" >&2 || true
  tail -5 "$LOGDIR/warmup.out" "$LOGDIR/slurmctld.log" "$LOGDIR/slurmdbd.log" >&2
  die "warm-up job $jid is '$st' in sacct, not COMPLETED, after 30 s"
}

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"
[[ "$R2D2_SLURM_NODES" =~ ^[1-9][0-9]?$ ]] ||
  die "R2D2_SLURM_NODES=$R2D2_SLURM_NODES: expected a node count from 1 to 99 (default 2)"
[[ "$R2D2_SLURM_GRACE_S" =~ ^[0-9]+$ ]] ||
  die "R2D2_SLURM_GRACE_S=$R2D2_SLURM_GRACE_S: expected whole seconds (default 30)"
lock
install_packages
lap "packages"
ensure_hostname
start_munge
lap "munged"
write_configs
restart_changed
CTLD_START=0
alive "$CTLD_PID" slurmctld || CTLD_START=1
start_mariadb
prepare_db
lap "MariaDB"
start_slurmdbd
lap "slurmdbd"
start_slurmctld
lap "slurmctld"
start_slurmds
wait_idle
lap "slurmd, nodes idle"
if [ "$STARTED" = 1 ] && [ "$R2D2_SLURM_WARMUP" = 1 ]; then
  warm_up
  lap "warm-up job in sacct"
fi
[ "$STARTED" = 1 ] && how="started" || how="already up"
log "cluster $CLUSTER $how: nodes ${NODES[*]} ($NODE_CPUS CPU(s), $NODE_MEM MiB each), partitions" \
  "$PARTITION (default) and high; state and logs in $R2D2_SLURM_DIR"
printf '[r2d2-slurm start] TIMING %-28s %6s s\n' TOTAL "$(since "$T0")"
