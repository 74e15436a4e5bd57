"""SIP call set-up time (INVITE sent -> 200 OK received at the caller, p50/p99) and the interarrival jitter of
the bridge's outbound RTP as the caller receives it (RFC 3550 A.8), on loopback.

    .venv/bin/python bench/sip_setup.py [--calls 60] [--concurrency 6] [--seconds 1] [--transport udp|tcp]

Starts the Savants emulator (voice ``echo``) and the bridge (SIP on a free port, in-process under uvicorn,
warm token on as in production) on 127.0.0.1, then places ``--calls`` calls with our SIP caller
(``telephony-bridge sipcall``'s code), ``--concurrency`` at a time. The figure includes admission (device
reservation + the warm token request to the emulator), RTP port binding and the SDP answer: what a carrier
waits between its INVITE and our 200. Machine load moves it; compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from telephony_bridge.app import create_app
from telephony_bridge.serving import running
from telephony_bridge.settings import load_settings
from telephony_bridge.tools.emulator import EmulatorConfig, create_emulator_app
from telephony_bridge.tools.sip_caller import sip_load


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(args: argparse.Namespace, target: str) -> tuple[list[float], list[float]]:
    results = await sip_load(target, args.calls, args.concurrency, args.seconds, 0.0, None, transport=args.transport)
    failed = [r.summary() for r in results if not r.answered]
    if failed:
        raise SystemExit(f"{len(failed)} calls failed, e.g. {failed[0]}")
    return [1000 * r.setup_s for r in results if r.setup_s is not None], [r.jitter_ms for r in results]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each call after the 200 OK")
    parser.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    args = parser.parse_args()
    with running(create_emulator_app(EmulatorConfig(api_key="bench-key", voice="echo"))) as emulator:
        settings = load_settings(
            env={},
            **{
                "savants.base_url": emulator.http_url,
                "savants.api_key": "bench-key",
                "savants.device_ids": ["bench-a", "bench-b", "bench-c"],
                "server.host": "127.0.0.1",
                "sip.port": 0,
                "sip.rtp_ports": "40000-40999",
                "sip.allowed_sources": ["127.0.0.0/8"],
                "twilio.allow_unsigned": True,  # no Twilio in this bench
            },
        )
        with running(create_app(settings)) as bridge:
            port = httpx.get(bridge.http_url + "/status", timeout=5).json()["sip"]["port"]
            setup_ms, jitter_ms = asyncio.run(measure(args, f"sip:ai@127.0.0.1:{port}"))
    print(
        f"SIP set-up (INVITE -> 200 OK), {len(setup_ms)} calls over {args.transport}, {args.concurrency} at a time: "
        f"p50 {statistics.median(setup_ms):.1f} ms, p99 {percentile(setup_ms, 99):.1f} ms, "
        f"max {max(setup_ms):.1f} ms; jitter of the bridge's RTP at the caller (RFC 3550): "
        f"p50 {statistics.median(jitter_ms):.2f} ms, max {max(jitter_ms):.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
