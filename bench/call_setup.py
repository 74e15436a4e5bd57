"""How long a caller waits for the AI: cold start vs warm token vs preconnect.

    .venv/bin/python bench/call_setup.py [--calls 10] [--token-delay 0.15] [--confirm-delay 0.10]

Runs the emulator (voice ``tone``: it speaks from the first moment) with simulated server latency, and the
bridge, both in this process on 127.0.0.1, then places calls the way Twilio does (signed webhook, then the
stream). For each start-up mode it prints, from Twilio's ``start`` message: the Savants session confirmed
(``ai_connect``) and the first AI audio handed to Twilio (``first_ai_audio``), p50 / p95 / max over the calls,
as the bridge itself logged them. The cold start is the naive baseline: token and socket only at ``start``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from telephony_bridge.app import create_app
from telephony_bridge.serving import ServerThread, running
from telephony_bridge.settings import load_settings
from telephony_bridge.tools.emulator import EmulatorConfig, create_emulator_app
from telephony_bridge.tools.twilio_flow import run_flow

AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
PUBLIC_URL = "https://bridge.bench.test"
MODES: dict[str, dict[str, Any]] = {
    "cold (token + socket at start)": {"savants.warm_token": False},
    "warm token (default)": {},
    "warm token + preconnect": {"savants.preconnect": True},
}


class CallEnded(logging.Handler):
    """Collects the bridge's one 'call ended' line per call, with its figures."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "call ended":
            self.records.append(record)


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"{1000 * statistics.median(values):6.0f} {1000 * p95:6.0f} {1000 * values[-1]:6.0f}"


async def place_calls(bridge: ServerThread, calls: int) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
        for _ in range(calls):
            result = await run_flow(
                bridge.http_url, http=http, seconds=0.6, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL
            )
            if result.outcome != "served":
                raise SystemExit(f"a call was not served: {result.reason}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--token-delay", type=float, default=0.15, help="emulated token endpoint latency, s")
    parser.add_argument("--confirm-delay", type=float, default=0.10, help="emulated voice-stream confirmation, s")
    args = parser.parse_args()

    handler = CallEnded()
    logging.getLogger("telephony_bridge.bridge").addHandler(handler)
    logging.getLogger("telephony_bridge.bridge").setLevel(logging.INFO)
    emulator_config = EmulatorConfig(
        api_key="bench-key", voice="tone", token_delay_s=args.token_delay, confirm_delay_s=args.confirm_delay
    )
    print(
        f"{args.calls} calls per mode; emulated Savants latency: token {1000 * args.token_delay:.0f} ms, "
        f"confirmation {1000 * args.confirm_delay:.0f} ms"
    )
    print(f"{'':32} {'ai_connect ms':>20}   {'first_ai_audio ms':>20}")
    print(f"{'':32} {'p50    p95    max':>20}   {'p50    p95    max':>20}")
    with running(create_emulator_app(emulator_config)) as emulator:
        for mode, overrides in MODES.items():
            settings = load_settings(
                env={},
                **{
                    "savants.base_url": emulator.http_url,
                    "savants.api_key": "bench-key",
                    "savants.device_ids": ["bench-1", "bench-2"],
                    "server.public_url": PUBLIC_URL,
                    "twilio.auth_token": AUTH_TOKEN,
                    **overrides,
                },
            )
            handler.records.clear()
            with running(create_app(settings)) as bridge:
                asyncio.run(place_calls(bridge, args.calls))
            connect = [r.ai_connect_s for r in handler.records]  # type: ignore[attr-defined]
            first = [r.first_ai_audio_s for r in handler.records]  # type: ignore[attr-defined]
            print(f"{mode:32} {percentiles(connect):>20}   {percentiles(first):>20}", flush=True)
    print("first_ai_audio includes the playout prebuffer (audio.playout_prebuffer_ms, 60 ms by default).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
