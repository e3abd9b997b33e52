#!/usr/bin/env bash
# The BIDS-App image, built from the unmodified top-level Dockerfile and run as a user would:
#   1. .ci/build-image.sh: podman & co from apt, the Debian base image, the image build;
#   2. the image size (<= 1.5 GB), its OCI labels, no compiler inside;
#   3. the example dataset run as a non-root user, input read-only, read-only image, no
#      network; outputs and grey-matter CBF (within 5 % of the truth) checked on the host,
#      input unchanged; 4. --version and --help;
#   5. an invalid dataset fails with one 'aslprep-lite: error:' line and no traceback.
# Prints the time of each part. Needs the project's .venv (see .ci/run) for the host-side
# checks. ENGINE=docker uses docker instead (no apt or base-image step), as on GitHub Actions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
export ENGINE=${ENGINE:-podman}
export IMAGE=${IMAGE:-localhost/aslprep_lite:ci}
PY=${PYTHON:-$ROOT/.venv/bin/python}
MAX_IMAGE_BYTES=1500000000
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/.ci/recipes/containers.conf}

T0=$SECONDS
# shellcheck source=.ci/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ -x "$PY" ] || { say "no $PY: create the project's venv first (.ci/run does)"; exit 1; }

check_image() {
  local size labels
  size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
  say "image size: $((size / 1000000)) MB (limit $((MAX_IMAGE_BYTES / 1000000)) MB)"
  [ "$size" -le "$MAX_IMAGE_BYTES" ] || { say "FAIL: image too large"; exit 1; }
  labels=$("$ENGINE" image inspect --format '{{json .Config.Labels}}' "$IMAGE")
  say "labels: $labels"
  for key in version source licenses; do
    grep -q "\"org.opencontainers.image.$key\"" <<<"$labels" || { say "FAIL: no $key label"; exit 1; }
  done
  # no compiler in the final image
  # shellcheck disable=SC2016  # $c is expanded by the shell in the container
  "$ENGINE" run --rm --network none --entrypoint sh "$IMAGE" -c \
    'for c in gcc cc c++ g++ clang make; do if command -v "$c"; then exit 1; fi; done' \
    || { say "FAIL: a compiler is in the image"; exit 1; }
}

SCRATCH=$(mktemp -d /tmp/aslprep_container.XXXXXX)
chmod 755 "$SCRATCH"
cleanup() {  # keep the scratch directory of a failed run for a look
  local status=$?
  if [ "$status" -eq 0 ]; then rm -rf "$SCRATCH"; else say "kept $SCRATCH"; fi
}
trap cleanup EXIT

# The app runs as a non-root user: uid 1000 when this script is root, else the caller.
if [ "$(id -u)" -eq 0 ]; then RUN_USER=1000:1000; else RUN_USER=$(id -u):$(id -g); fi
mkdir_for_user() {
  mkdir -p "$@"
  if [ "$(id -u)" -eq 0 ]; then chown "$RUN_USER" "$@"; fi
}

run_app() {  # run_app DATASET OUT WORK [ARGS...]: the BIDS-App call of the docs, hardened
  local data=$1 out=$2 work=$3
  shift 3
  timeout 600 "$ENGINE" run --rm --network none --read-only --tmpfs /tmp --user "$RUN_USER" \
    -v "$data:/data:ro" -v "$out:/out" -v "$work:/work" \
    "$IMAGE" /data /out participant -w /work "$@"
}

example_run() {
  mkdir_for_user "$SCRATCH/out" "$SCRATCH/work"
  (cd "$SCRATCH/bids" && find . -type f -exec sha256sum {} + | sort) >"$SCRATCH/input.sha256"
  if ! run_app "$SCRATCH/bids" "$SCRATCH/out" "$SCRATCH/work" 2>"$SCRATCH/run.stderr"; then
    cat "$SCRATCH/run.stderr"
    say "FAIL: the example run exited non-zero"
    exit 1
  fi
  cat "$SCRATCH/run.stderr"
}

check_outputs() {
  "$PY" .ci/smoke.py check "$SCRATCH/out" "$SCRATCH"
  (cd "$SCRATCH/bids" && find . -type f -exec sha256sum {} + | sort) | cmp -s - "$SCRATCH/input.sha256" \
    || { say "FAIL: the input dataset changed"; exit 1; }
}

check_cli() {
  local expected got help
  expected="aslprep-lite $("$PY" -c 'from aslprep_lite import __version__; print(__version__)')"
  got=$("$ENGINE" run --rm --network none "$IMAGE" --version)
  [ "$got" = "$expected" ] || { say "FAIL: --version printed '$got', expected '$expected'"; exit 1; }
  help=$("$ENGINE" run --rm --network none "$IMAGE" --help)
  grep -q '^usage: aslprep-lite' <<<"$help" || { say "FAIL: --help"; exit 1; }
  say "ok: --version: $got; --help"
}

check_templates() {  # the embedded template is served offline, read-only, as a non-root user
  local got
  got=$("$ENGINE" run --rm --network none --read-only --tmpfs /tmp --user "$RUN_USER" \
    --entrypoint python "$IMAGE" -c "from aslprep_lite.templates import get_template; \
print(get_template('MNI152NLin2009aSym', resolution=2, suffix='T1w'))")
  [ "$got" = "/opt/templateflow/tpl-MNI152NLin2009aSym/tpl-MNI152NLin2009aSym_res-2_T1w.nii.gz" ] \
    || { say "FAIL: embedded template not served: '$got'"; exit 1; }
  say "ok: embedded template served offline: $got"
}

bad_run() {
  mkdir_for_user "$SCRATCH/bad-out" "$SCRATCH/bad-work"
  local rc=0
  run_app "$SCRATCH/bad" "$SCRATCH/bad-out" "$SCRATCH/bad-work" 2>"$SCRATCH/bad.stderr" || rc=$?
  [ "$rc" -ne 0 ] || { say "FAIL: the invalid dataset exited 0"; exit 1; }
  say "invalid dataset: exit code $rc"
  "$PY" .ci/smoke.py check-error "$SCRATCH/bad.stderr"
}

bash .ci/build-image.sh
timed "image checks" check_image
timed "example dataset (host)" "$PY" .ci/smoke.py generate "$SCRATCH"
timed "example run in the container" example_run
timed "output checks (host)" check_outputs
timed "--version/--help" check_cli
timed "embedded template" check_templates
timed "invalid dataset run" bad_run
say "all container checks passed in $((SECONDS - T0)) s"
