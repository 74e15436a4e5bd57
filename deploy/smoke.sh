#!/usr/bin/env bash
# Smoke-test a built image the way a user runs it: without SAVANTS_BASE_URL it refuses to start; it carries the
# compiled audio kernels and no C compiler; the emulator (Savants stand-in) and the bridge in production mode as
# two containers, /healthz 200 and "audio kernels: compiled" in its log, one simulated call through the bridge,
# then SIGTERM and exit 0.
#   deploy/smoke.sh [IMAGE]          (default telephony-bridge:dev)
# The call is placed from the host with `telephony-bridge call` ($TELEPHONY_BRIDGE, default .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib.sh
image=${1:-telephony-bridge:dev}
cli=${TELEPHONY_BRIDGE:-.venv/bin/telephony-bridge}
run=tb-smoke-$$
token=smoke-auth-token
public=https://bridge.example.test

cleanup() {
  docker rm -f "$run-bridge" "$run-emulator" >/dev/null 2>&1 || true
  docker network rm "$run" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# The image never falls into dev mode: with no Savants URL it refuses to start, naming what is missing.
if refused=$(timeout 60 docker run --rm "$image" 2>&1); then
  echo "smoke: the image started without SAVANTS_BASE_URL; it must refuse" >&2
  exit 1
fi
if ! grep -q SAVANTS_BASE_URL <<<"$refused"; then
  echo "smoke: the refusal does not name SAVANTS_BASE_URL: $refused" >&2
  exit 1
fi
echo "smoke: refuses to start without SAVANTS_BASE_URL"

# The compiled audio kernels rather than the numpy fallback, and no compiler: that stays in the build stage.
found=$(timeout 60 docker run --rm --entrypoint python3 "$image" -c "
import shutil
from telephony_bridge.audio import kernels
from telephony_bridge.inbound import CallerPath
from telephony_bridge.outbound import AiAudioPath
from telephony_bridge.twilio.leg import MediaTap
compilers = [c for c in ('gcc', 'cc', 'x86_64-linux-gnu-gcc', 'clang') if shutil.which(c)]
built = kernels.EXTENSION and CallerPath and AiAudioPath and MediaTap
print('compiled' if built else 'not all compiled', *compilers)" 2>&1) || true
if [ "$found" != "compiled" ]; then
  echo "smoke: expected the compiled audio kernels and frame path and no C compiler in the image; found: $found" >&2
  exit 1
fi
echo "smoke: compiled audio kernels and frame path, no C compiler"

docker network create "$run" >/dev/null
docker run -d --name "$run-emulator" --network "$run" --network-alias savants "$image" \
  emulator --host 0.0.0.0 --port 9100 --api-key smoke-key >/dev/null

# Production mode: what a user sets (README, Configuration), with the emulator as the Savants service.
docker run -d --name "$run-bridge" --network "$run" -p 127.0.0.1::8080 \
  -e SAVANTS_BASE_URL=http://savants:9100 \
  -e SAVANTS_API_KEY=smoke-key \
  -e SAVANTS_DEVICE_IDS=device-a,device-b \
  -e TWILIO_AUTH_TOKEN=$token \
  -e PUBLIC_URL=$public \
  -e BRIDGE__SERVER__DRAIN_TIMEOUT_S=10 \
  "$image" >/dev/null
port=$(docker port "$run-bridge" 8080/tcp | head -n1 | sed 's/.*://')
echo "smoke: bridge container on 127.0.0.1:$port"

if ! wait_http "http://127.0.0.1:$port/healthz" 60; then
  docker logs "$run-bridge" >&2
  exit 1
fi
echo "smoke: /healthz 200"
if ! grep -qF "audio kernels: compiled" <<<"$(docker logs "$run-bridge" 2>&1)"; then
  echo "smoke: the bridge does not log \"audio kernels: compiled\"; its log:" >&2
  docker logs "$run-bridge" >&2
  exit 1
fi
echo "smoke: serving with the compiled audio kernels"

if ! "$cli" call --url "ws://127.0.0.1:$port/media-stream" --auth-token $token --public-url $public \
  --wav tests/data/speech_8k.wav --seconds 3; then
  echo "smoke: the simulated call failed; bridge log:" >&2
  docker logs "$run-bridge" >&2
  exit 1
fi
echo "smoke: call served"

docker kill --signal TERM "$run-bridge" >/dev/null
status=$(timeout 30 docker wait "$run-bridge")
if [ "$status" != "0" ]; then
  echo "smoke: after SIGTERM the bridge exited $status, expected 0; its log:" >&2
  docker logs "$run-bridge" >&2
  exit 1
fi
echo "smoke: SIGTERM -> exit 0"
echo "smoke: passed"
