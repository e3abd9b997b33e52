#!/usr/bin/env bash
# Builds the BIDS-App image from the unmodified top-level Dockerfile, printing the time of each
# part: podman & co from apt (skipped when installed), the Debian base image (debootstrapped:
# no container registry is reachable on these machines; skipped when present), the build.
# The proxy CA bundle ($PIPCERT, default the system bundle; "" for none) reaches pip as the
# build secret `pipcert`, never as a layer. ENGINE=docker: only the build (e.g. GitHub Actions).
# Used by .ci/container.sh and .ci/apptainer.sh. Tag: $IMAGE (default localhost/aslprep_lite:ci).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ENGINE=${ENGINE:-podman}
IMAGE=${IMAGE:-localhost/aslprep_lite:ci}
PIPCERT=${PIPCERT-/etc/ssl/certs/ca-certificates.crt}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/.ci/recipes/containers.conf}

# shellcheck source=.ci/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_podman() {
  local pkgs=(podman runc fuse-overlayfs slirp4netns uidmap debootstrap) installed
  installed=$(dpkg-query -W -f='${Status}\n' "${pkgs[@]}" 2>/dev/null | grep -c 'install ok installed' || true)
  if [ "$installed" -ne "${#pkgs[@]}" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
  podman --version
}

build() {
  local version revision source log
  version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  source=${SOURCE_URL:-$(git config --get remote.origin.url 2>/dev/null || true)}
  [[ $source =~ ^(https?|ssh|git)://|^git@ ]] || source=unknown   # not a local path
  local args=(build -t "$IMAGE" --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
    --build-arg "SOURCE=$source")
  if [ -n "$PIPCERT" ] && [ -s "$PIPCERT" ]; then
    args+=(--secret "id=pipcert,src=$PIPCERT")
  fi
  log=$(mktemp)
  if ! timeout 1200 "$ENGINE" "${args[@]}" . >"$log" 2>&1; then
    tail -n 40 "$log"
    rm -f "$log"
    say "image build failed"
    exit 1
  fi
  rm -f "$log"
  say "built $IMAGE (version $version, revision $revision)"
}

if [ "$ENGINE" = podman ]; then
  timed "install podman (apt)" install_podman
  timed "base image" bash .ci/recipes/make-base-image.sh trixie
fi
timed "image build" build
