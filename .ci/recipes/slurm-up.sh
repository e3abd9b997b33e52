#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, everything under $S (default /tmp/aslprep-slurm),
# nothing in /etc. Run as root. Exports nothing: set SLURM_CONF=$S/slurm.conf yourself.
# Needs: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# Idempotent: exits 0 at once if this cluster already answers. Stop it with slurm-down.sh.
# Adapted from the team's shared recipes.
set -euo pipefail
S=${S:-/tmp/aslprep-slurm}
export SLURM_CONF=$S/slurm.conf

alive() { local pid; pid=$(cat "$1" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; }

# (sinfo takes ~10 s to give up on a dead controller: ask only when one is running)
if alive "$S/run/slurmctld.pid" && alive "$S/run/slurmd.pid" \
    && timeout 15 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
  echo "slurm already up ($SLURM_CONF)"
  exit 0
fi

mkdir -p "$S/munge" "$S/munge-run" "$S/state/ctld" "$S/state/d" "$S/log" "$S/run"
if [ ! -s "$S/munge/munge.key" ]; then
  dd if=/dev/urandom of="$S/munge/munge.key" bs=1 count=1024 status=none
fi
chown -R munge:munge "$S/munge" "$S/munge-run"
chmod 700 "$S/munge"; chmod 400 "$S/munge/munge.key"; chmod 755 "$S/munge-run"   # munged insists

if ! alive "$S/munge-run/munged.pid"; then
  # --force: a stale socket left by a killed munged must not stop a fresh start
  runuser -u munge -- /usr/sbin/munged --force --key-file="$S/munge/munge.key" \
    --socket="$S/munge-run/munge.socket" --pid-file="$S/munge-run/munged.pid" \
    --log-file="$S/munge/munged.log" --seed-file="$S/munge/munged.seed"
fi

mem_mb=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) * 8 / 10 / 1024 ))
cat > "$SLURM_CONF" <<CONF
ClusterName=ci
SlurmctldHost=localhost
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$S/munge-run/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$S/state/ctld
SlurmdSpoolDir=$S/state/d
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

alive "$S/run/slurmctld.pid" || slurmctld -i   # -i: ignore/clear stale state from a previous run
alive "$S/run/slurmd.pid" || slurmd -N localhost
for _ in $(seq 1 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^idle'; then
    echo "slurm up ($SLURM_CONF)"
    exit 0
  fi
  sleep 0.5
done
echo "slurm did not come up" >&2
tail -n 20 "$S"/log/*.log "$S/munge/munged.log" >&2 || true
exit 1
