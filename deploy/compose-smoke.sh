#!/usr/bin/env bash
# Bring deploy/compose.yaml up (two bridges, Redis, the emulator, HAProxy), place simulated calls through the
# one public port, check both replicas took part (sharing Redis), then take it down.
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
# Round robin spreads webhooks and streams over both replicas; a stream whose webhook went to the other one
# finds its reservation and stream token in Redis. Every call must end on one of them, and both must work.
ended=0
for replica in bridge-1 bridge-2; do
  log=$(dc logs --no-color "$replica")
  if ! grep -q '"msg":"call admitted"\|"msg":"call ended"' <<<"$log"; then
    echo "compose: $replica took no part in any call" >&2
    dc logs >&2
    exit 1
  fi
  ended=$((ended + $(grep -c '"msg":"call ended"' <<<"$log" || true)))
done
if [ "$ended" -ne 4 ]; then
  echo "compose: $ended calls ended on the bridges, expected 4" >&2
  dc logs >&2
  exit 1
fi
echo "compose: both replicas took part; 4 calls ended"
echo "compose: passed"
