#!/usr/bin/env bash
# Stops the test cluster that start.sh started: cancels every job (job processes outlive slurmd otherwise), then
# stops every node's slurmd, slurmctld, slurmdbd, MariaDB and munged by the pids in their pid files. Idempotent.
# slurmctld stops before slurmdbd so that it can flush its last accounting records.
# Settings: R2D2_SLURM_DIR (as for start.sh); R2D2_SLURM_PURGE=1 also deletes it, the accounting DB included.
set -uo pipefail
SCRIPT=stop
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ "$(id -u)" = 0 ] || die "must run as root"
[ -d "$R2D2_SLURM_DIR" ] || { log "nothing to stop: $R2D2_SLURM_DIR does not exist"; exit 0; }
lock

if alive "$CTLD_PID" slurmctld && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086 # one argument per job id
    timeout 10 scancel --full --quiet $jobs 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  # Job processes still alive after that (a step ignoring SIGTERM): each node's slurmd knows their pids.
  # `scontrol listpids` asks the slurmd of the host it runs on, so it runs in that node's UTS namespace.
  for pf in $(slurmd_pid_files); do
    alive "$pf" slurmd || continue
    pids=$(timeout 5 nsenter -t "$(cat "$pf")" -u scontrol listpids 2>/dev/null |
      awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}' | tr '\n' ' ')
    if [ -n "${pids// /}" ]; then
      log "killing leftover job processes: $pids"
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
    fi
  done
fi

for pf in $(slurmd_pid_files); do stop_pid "$pf" slurmd; done
stop_pid "$CTLD_PID" slurmctld
stop_pid "$DBD_PID" slurmdbd
stop_pid "$MY_PID" mariadbd 60 # SIGTERM is a clean InnoDB shutdown
stop_pid "$MUNGE_PID" munged

if [ "${R2D2_SLURM_PURGE:-0}" = 1 ]; then
  rm -rf "$R2D2_SLURM_DIR"
  log "removed $R2D2_SLURM_DIR"
fi
log "stopped in $(since "$T0") s"
