#!/usr/bin/env bash
# Build the images deploy/compose.yaml and deploy/smoke.sh run:
#   telephony-bridge:dev           the bridge (and the emulator), from the repository's Dockerfile
#   telephony-bridge-services:dev  Redis and HAProxy from Debian's packages (deploy/services/)
# BASE_IMAGE chooses the base of both; unset, the official images are pulled, and where no image registry
# answers a base is built from Debian's packages (deploy/base-image.sh). The machine's CA bundle is passed to
# pip as a build secret (a TLS-intercepting proxy), never stored in an image.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib.sh
tag=${TAG:-dev}

bridge_base=${BASE_IMAGE:-python:3.12.11-slim-bookworm}
services_base=${BASE_IMAGE:-debian:12.11-slim}
if [ -z "${BASE_IMAGE:-}" ] && ! { docker pull -q "$bridge_base" && docker pull -q "$services_base"; } >/dev/null 2>&1; then
  echo "build: no image registry answers; building a base from Debian's packages"
  bridge_base=telephony-bridge-base:bookworm
  services_base=$bridge_base
  deploy/base-image.sh "$bridge_base"
fi

echo "build: telephony-bridge:$tag on $bridge_base"
docker_build --build-arg "BASE_IMAGE=$bridge_base" $(ca_secret_args) -t "telephony-bridge:$tag" .
echo "build: telephony-bridge-services:$tag on $services_base"
docker_build --build-arg "BASE_IMAGE=$services_base" -t "telephony-bridge-services:$tag" deploy/services
