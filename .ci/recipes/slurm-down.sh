#!/usr/bin/env bash
# Stops the cluster of slurm-up.sh (slurmd, slurmctld, munged), by the pids it recorded.
set -euo pipefail
S=${S:-/tmp/aslprep-slurm}
for f in "$S/run/slurmd.pid" "$S/run/slurmctld.pid" "$S/munge-run/munged.pid"; do
  pid=$(cat "$f" 2>/dev/null) || continue
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "stopped $(basename "$f" .pid) pid $pid"
  fi
done
