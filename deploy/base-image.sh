#!/usr/bin/env bash
# Build a local Python base image from Debian's packages, for machines that reach no image registry:
#   deploy/base-image.sh [TAG]      (default telephony-bridge-base:bookworm; kept if it already exists)
# then: docker build --build-arg BASE_IMAGE=telephony-bridge-base:bookworm ...
# Needs root, mmdebstrap and a Docker engine. About 30 s with a nearby Debian mirror.
set -euo pipefail
tag=${1:-telephony-bridge-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base-image: $tag exists"
  exit 0
fi
echo "base-image: building $tag from Debian bookworm (python3, python3-venv, ca-certificates)"
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates --quiet \
  --customize-hook='chroot "$1" sh -c "apt-get clean; rm -rf /var/lib/apt/lists/*"' \
  bookworm - \
  "deb $mirror bookworm main" \
  "deb $mirror bookworm-updates main" \
  "deb $security bookworm-security main" |
  docker import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "base-image: $tag ready"
