#!/usr/bin/env bash
# Build the images deploy/compose.yaml and deploy/smoke.sh run:
#   telephony-bridge:dev           the bridge (and the emulator), from the repository's Dockerfile
#   telephony-bridge-services:dev  Redis and HAProxy from Debian's packages (deploy/services/)
# The bridge is built on BUILD_IMAGE (a C compiler and Python's headers, for the compiled audio kernels; the
# build fails without them) and runs on BASE_IMAGE (no compiler); both must have the same Python.
# Unset, the official images are pulled (python:3.12.11-bookworm and python:3.12.11-slim-bookworm), and where no
# image registry answers both bases are built from Debian's packages (deploy/base-image.sh: bookworm's python3).
# BASE_IMAGE alone: BUILD_IMAGE is that same image (sure to be the same Python; the build stops, saying so, if
# it has no compiler), and the services image is built on it too. The machine's CA bundle is passed to pip as a
# build secret (a TLS-intercepting proxy), never stored in an image.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib.sh
tag=${TAG:-dev}

bridge_base=${BASE_IMAGE:-python:3.12.11-slim-bookworm}
build_base=${BUILD_IMAGE:-${BASE_IMAGE:-python:3.12.11-bookworm}}
services_base=${BASE_IMAGE:-debian:12.11-slim}
pull_all() { for image in "$@"; do docker pull -q "$image" || return 1; done >/dev/null 2>&1; }
if [ -z "${BASE_IMAGE:-}" ] && [ -z "${BUILD_IMAGE:-}" ] && ! pull_all "$bridge_base" "$build_base" "$services_base"; then
  echo "build: no image registry answers; building the bases from Debian's packages"
  bridge_base=telephony-bridge-base:bookworm
  build_base=telephony-bridge-build-base:bookworm
  services_base=$bridge_base
  deploy/base-image.sh "$bridge_base"
  deploy/base-image.sh --build "$build_base"
fi

echo "build: telephony-bridge:$tag, built on $build_base, running on $bridge_base"
docker_build --build-arg "BUILD_IMAGE=$build_base" --build-arg "BASE_IMAGE=$bridge_base" $(ca_secret_args) \
  -t "telephony-bridge:$tag" .
echo "build: telephony-bridge-services:$tag on $services_base"
docker_build --build-arg "BASE_IMAGE=$services_base" -t "telephony-bridge-services:$tag" deploy/services
