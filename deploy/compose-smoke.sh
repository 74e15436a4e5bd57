#!/usr/bin/env bash
# Bring deploy/compose.yaml up (two bridges, Redis, the emulator, HAProxy), place simulated calls through the
# one public port, check both replicas served and shared Redis, then take it down.
#   deploy/compose-smoke.sh          (after deploy/build.sh; the calls come from $TELEPHONY_BRIDGE, default .venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib.sh
cli=${TELEPHONY_BRIDGE:-.venv/bin/telephony-bridge}
project=tb-compose-$$
export BRIDGE_PORT=${BRIDGE_PORT:-$(free_port)}
dc() { compose -p "$project" -f deploy/compose.yaml "$@"; }

cleanup() { dc down -v --timeout 5 >/dev/null 2>&1 || true; }
trap cleanup EXIT

dc up -d
if ! wait_http "http://127.0.0.1:$BRIDGE_PORT/readyz" 90; then
  dc ps >&2
  dc logs >&2
  exit 1
fi
echo "compose: ready on 127.0.0.1:$BRIDGE_PORT"

# Four calls, two at a time: round robin sends webhooks and streams to both replicas.
if ! "$cli" loadtest --url "ws://127.0.0.1:$BRIDGE_PORT/media-stream" --auth-token demo-auth-token \
  --public-url https://bridge.example.test --wav tests/data/speech_8k.wav --calls 4 --concurrency 2 \
  --seconds 3 --ramp 1 --deadline 60; then
  dc logs >&2
  exit 1
fi
for replica in bridge-1 bridge-2; do
  log=$(dc logs --no-color "$replica")
  if ! grep -q '"msg":"call ended"' <<<"$log"; then
    echo "compose: $replica served no call" >&2
    dc logs >&2
    exit 1
  fi
done
echo "compose: both replicas served calls"
echo "compose: passed"
