#!/usr/bin/env bash
# nipype's SLURM plugin on a real single-node Slurm cluster: installs Debian's slurmctld, slurmd,
# slurm-client and munge (skipped when installed), brings the cluster of
# .ci/recipes/slurm-up.sh up (everything under /tmp/aslprep-slurm), runs tests/test_slurm.py
# (a participant through `--use-plugin` SLURM must give byte-identical outputs to MultiProc)
# and stops the cluster again if it started it. Needs root and the project's .venv (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
export S=${S:-/tmp/aslprep-slurm}
export SLURM_CONF=$S/slurm.conf ASLPREP_SLURM_DIR=$S
export ASLPREP_LITE_REQUIRE_SLURM=1   # the test must run here, not skip
T0=$SECONDS
# shellcheck source=.ci/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ -x "$PY" ] || { say "no $PY: create the project's venv first (.ci/run does)"; exit 1; }

start=$SECONDS
pkgs=(slurmctld slurmd slurm-client munge)
installed=$(dpkg-query -W -f='${Status}\n' "${pkgs[@]}" 2>/dev/null | grep -c 'install ok installed' || true)
if [ "$installed" -ne "${#pkgs[@]}" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
say "install slurm + munge (apt): $((SECONDS - start)) s"

start=$SECONDS
up=$(bash .ci/recipes/slurm-up.sh)
echo "$up"
if [[ $up != *"already up"* ]]; then trap 'bash .ci/recipes/slurm-down.sh' EXIT; fi
say "cluster up: $((SECONDS - start)) s"

start=$SECONDS
timeout 900 "$PY" -m pytest tests/test_slurm.py -v -rA -p no:cacheprovider
say "SLURM plugin test: $((SECONDS - start)) s; slurm.sh total $((SECONDS - T0)) s"
