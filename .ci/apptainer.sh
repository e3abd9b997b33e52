#!/usr/bin/env bash
# The BIDS-App image as an Apptainer SIF, run as on a cluster: an unprivileged user, a
# read-only image, the input bound read-only, no network. Apptainer is not packaged for
# Debian 12/13, so it runs inside a helper image with Debian sid's apptainer
# (.ci/recipes/apptainer-tool.Containerfile). Steps, each timed:
#   1. .ci/build-image.sh (podman, base image, image build; quick when nothing changed)
#   2. the helper image   3. podman save -> apptainer build aslprep_lite.sif
#   4. the example dataset in the SIF as uid 1000 (setpriv), outputs and grey-matter CBF
#      checked on the host; --version from the SIF.
# Not part of .ci/run: it takes ~3 min and depends on Debian sid, a moving target.
# Needs root (podman --privileged for FUSE) and the project's .venv (see .ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
export ENGINE=podman
export IMAGE=${IMAGE:-localhost/aslprep_lite:ci}
TOOL=${TOOL:-localhost/aslprep-apptainer-tool}
PY=${PYTHON:-$ROOT/.venv/bin/python}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/.ci/recipes/containers.conf}

T0=$SECONDS
# shellcheck source=.ci/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ -x "$PY" ] || { say "no $PY: create the project's venv first (.ci/run does)"; exit 1; }
[ "$(id -u)" -eq 0 ] || { say "run as root (podman --privileged provides FUSE to Apptainer)"; exit 1; }

SCRATCH=$(mktemp -d /tmp/aslprep_apptainer.XXXXXX)
chmod 755 "$SCRATCH"
cleanup() {  # keep the scratch directory of a failed run for a look
  local status=$?
  if [ "$status" -eq 0 ]; then rm -rf "$SCRATCH"; else say "kept $SCRATCH"; fi
}
trap cleanup EXIT

build_tool() {
  local log
  log=$(mktemp)
  if ! timeout 900 podman build -t "$TOOL" -f .ci/recipes/apptainer-tool.Containerfile \
      .ci/recipes >"$log" 2>&1; then
    tail -n 40 "$log"
    rm -f "$log"
    say "helper image build failed"
    exit 1
  fi
  rm -f "$log"
}

build_sif() {
  mkdir -p "$SCRATCH/sif"
  podman save -q --format docker-archive -o "$SCRATCH/sif/image.tar" "$IMAGE"
  timeout 900 podman run --rm --privileged -v "$SCRATCH/sif:/w" "$TOOL" \
    apptainer build /w/aslprep_lite.sif docker-archive:///w/image.tar >"$SCRATCH/sif.log" 2>&1 \
    || { tail -n 40 "$SCRATCH/sif.log"; say "apptainer build failed"; exit 1; }
  rm -f "$SCRATCH/sif/image.tar"
  say "SIF size: $(( $(stat -c %s "$SCRATCH/sif/aslprep_lite.sif") / 1000000 )) MB"
}

# as_user ARGS...: run `apptainer ARGS` in the helper as uid 1000, the way a cluster user
# would. The host's /dev/fuse may be 0600; the helper's own device node is made usable by
# ordinary users, as it is on clusters.
as_user() {
  timeout 600 podman run --rm --privileged --network none \
    -v "$SCRATCH/sif:/w:ro" -v "$SCRATCH/bids:/data:ro" -v "$SCRATCH/out:/out" \
    -v "$SCRATCH/work:/work" "$TOOL" sh -c \
    'chmod 0666 /dev/fuse && exec setpriv --reuid 1000 --regid 1000 --init-groups \
       env HOME=/home/hpcuser apptainer "$@"' apptainer "$@"
}

run_sif() {
  mkdir -p "$SCRATCH/out" "$SCRATCH/work"
  chown 1000:1000 "$SCRATCH/out" "$SCRATCH/work"
  as_user run --cleanenv --containall --bind /data:/data:ro --bind /out --bind /work \
    /w/aslprep_lite.sif /data /out participant -w /work
  "$PY" .ci/smoke.py check "$SCRATCH/out" "$SCRATCH"
  local expected got
  expected="aslprep-lite $("$PY" -c 'from aslprep_lite import __version__; print(__version__)')"
  got=$(as_user run --cleanenv --containall /w/aslprep_lite.sif --version 2>/dev/null | tail -n1)
  [ "$got" = "$expected" ] || { say "FAIL: --version printed '$got', expected '$expected'"; exit 1; }
  say "ok: --version: $got"
}

bash .ci/build-image.sh
timed "helper image (Debian sid apptainer)" build_tool
timed "example dataset (host)" "$PY" .ci/smoke.py generate "$SCRATCH"
timed "podman save + apptainer build" build_sif
timed "example run in the SIF as uid 1000" run_sif
say "all Apptainer checks passed in $((SECONDS - T0)) s"
