#!/usr/bin/env bash
# Builds a local Debian base image with debootstrap (no container registry is reachable on the
# CI machines) and tags it with the name the Dockerfile's FROM line resolves to, e.g.
# docker.io/library/debian:trixie-slim, so the unmodified Dockerfile builds with podman.
# The Debian mirror is read from this host's own apt configuration. Skipped if the image exists.
# Usage: make-base-image.sh [SUITE]       (default trixie; needs podman and debootstrap, root)
# Adapted from the team's shared recipes.
set -euo pipefail
SUITE=${1:-trixie}
TAG=docker.io/library/debian:$SUITE-slim
if podman image exists "$TAG"; then
  echo "base image $TAG exists"
  exit 0
fi
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -E '/debian/?$' | head -n1 || true)
if [ -z "$mirror" ]; then
  mirror=$(awk '/^deb /&&$2~/\/debian\/?$/{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
if [ -z "$mirror" ]; then
  echo "no Debian mirror found in this host's apt sources" >&2
  exit 1
fi
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
if ! debootstrap --variant=minbase "$SUITE" "$W/rootfs" "$mirror" >"$W/debootstrap.log" 2>&1; then
  tail -n 30 "$W/debootstrap.log" >&2
  exit 1
fi
rm -rf "$W"/rootfs/var/cache/apt/archives/*.deb "$W"/rootfs/var/lib/apt/lists/* \
  "$W"/rootfs/usr/share/doc/* "$W"/rootfs/usr/share/man/*
tar -C "$W/rootfs" -c . | podman import -q --change 'CMD ["bash"]' - "$TAG"
echo "base image $TAG built from $SUITE"
