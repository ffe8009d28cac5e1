#!/usr/bin/env bash
# Stop the local cluster started by scripts/slurm/up.sh: cancel its jobs, then stop exactly the daemons whose
# pids up.sh recorded in DIR/pids (newest first), each checked by name so a reused pid is never signalled.
#   scripts/slurm/down.sh [DIR]      (DIR defaults to $SLURM_DIR or /tmp/normbench-slurm)
set -uo pipefail
DIR=$(realpath -m "${1:-${SLURM_DIR:-/tmp/normbench-slurm}}")
if [ ! -f "$DIR/pids" ]; then echo "slurm-down: no cluster recorded in $DIR/pids; nothing to stop"; exit 0; fi
if [ -f "$DIR/slurm.conf" ] && grep -q '^slurmctld ' "$DIR/pids"; then
  # Jobs first, while slurmctld and slurmd can still end them (their steps are not in DIR/pids).
  SLURM_CONF="$DIR/slurm.conf" timeout 20 scancel --full --quiet --user=root 2>/dev/null
  for _ in $(seq 40); do
    [ -z "$(SLURM_CONF="$DIR/slurm.conf" timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
    sleep 0.5
  done
fi
tac "$DIR/pids" | while read -r name pid; do
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || continue  # already gone (or the pid was reused)
  kill -TERM "$pid"
  for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  [ -d "/proc/$pid" ] && kill -KILL "$pid"
  echo "slurm-down: stopped $name ($pid)"
done
rm -f "$DIR/pids"
