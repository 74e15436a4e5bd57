#!/usr/bin/env bash
# Build local Python base images from Debian's packages, for machines that reach no image registry:
#   deploy/base-image.sh [TAG]           the runtime base: python3, python3-venv, ca-certificates
#                                        (default telephony-bridge-base:bookworm)
#   deploy/base-image.sh --build [TAG]   the build base: the same plus python3-dev, gcc and libc6-dev, which the
#                                        compiled audio kernels need (default telephony-bridge-build-base:bookworm)
# A tag that already exists is kept. Both carry Debian bookworm's python3, so the venv built on the one runs on
# the other: docker build --build-arg BUILD_IMAGE=telephony-bridge-build-base:bookworm \
#   --build-arg BASE_IMAGE=telephony-bridge-base:bookworm ...
# Needs root, mmdebstrap and a Docker engine. About 30 s (runtime) and a minute (build) with a nearby mirror.
set -euo pipefail
packages=python3,python3-venv,ca-certificates
default_tag=telephony-bridge-base:bookworm
if [ "${1:-}" = "--build" ]; then
  shift
  packages=$packages,python3-dev,gcc,libc6-dev
  default_tag=telephony-bridge-build-base:bookworm
fi
tag=${1:-$default_tag}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base-image: $tag exists"
  exit 0
fi
echo "base-image: building $tag from Debian bookworm (${packages//,/, })"
mmdebstrap --variant=minbase --include="$packages" --quiet \
  --customize-hook='chroot "$1" sh -c "apt-get clean; rm -rf /var/lib/apt/lists/*"' \
  bookworm - \
  "deb $mirror bookworm main" \
  "deb $mirror bookworm-updates main" \
  "deb $security bookworm-security main" |
  docker import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "base-image: $tag ready"
