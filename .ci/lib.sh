# Shared by the .ci scripts (sourced): messages prefixed with the script's name, and timing.
# shellcheck shell=bash
say() { echo "[$(basename "$0")] $*"; }
timed() {  # timed LABEL COMMAND...: run it and print how long it took
  local label=$1 start=$SECONDS
  shift
  "$@"
  say "$label: $((SECONDS - start)) s"
}
