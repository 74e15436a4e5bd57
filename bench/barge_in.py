"""How fast the AI falls silent when the caller talks over it, and whether line noise ever cuts it.

    .venv/bin/python bench/barge_in.py [--runs 5]

Emulator (voice ``talker``) and bridge run in this process on 127.0.0.1; a simulated caller asks a question
(tests/data/speech_8k.wav), then talks over the answer about a second into it. From the caller's own audio
and what they heard (one timeline): how far into the answer they started, and how long after their speech
onset the AI was silent at their ear. The naive baseline is the same bridge with barge-in off. Then calls
with only line noise during the answer count false barge-ins.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np

from telephony_bridge.app import create_app
from telephony_bridge.serving import running
from telephony_bridge.settings import load_settings
from telephony_bridge.tools import barge_in_probe as probe
from telephony_bridge.tools.caller import CallResult, read_wav
from telephony_bridge.tools.emulator import EmulatorConfig, create_emulator_app
from telephony_bridge.tools.twilio_flow import run_flow

AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
PUBLIC_URL = "https://bridge.bench.test"
SPEECH = read_wav(str(Path(__file__).resolve().parent.parent / "tests" / "data" / "speech_8k.wav"))
SECONDS = 6.5


async def call(bridge_url: str, said: np.ndarray) -> CallResult:
    async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
        flow = await run_flow(
            bridge_url, http=http, audio_in=said, seconds=SECONDS, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL
        )
    assert flow.call is not None, flow.reason
    return flow.call


def settings(emulator_url: str, **overrides: Any) -> Any:
    return load_settings(
        env={},
        **{
            "savants.base_url": emulator_url,
            "savants.api_key": "bench-key",
            "savants.device_ids": ["bench-1"],
            "server.public_url": PUBLIC_URL,
            "twilio.auth_token": AUTH_TOKEN,
            **overrides,
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    interruption = SPEECH[: int(1.5 * 8000)]
    offsets = [4.0 + 0.07 * i for i in range(args.runs)]
    emulator_config = EmulatorConfig(api_key="bench-key", voice="talker", talker_reply_s=4.0)
    with running(create_emulator_app(emulator_config)) as emulator:
        for label, overrides in (("barge-in on (default)", {}), ("barge-in off (naive)", {"barge_in.enabled": False})):
            stops = []
            with running(create_app(settings(emulator.http_url, **overrides))) as bridge:
                for run, at_s in enumerate(offsets):
                    said = probe.script(SPEECH, interruption, at_s, SECONDS, seed=run)
                    result = asyncio.run(call(bridge.http_url, said))
                    cut = probe.measure(result.heard, said, at_s)
                    stops.append(cut.stop_after_s)
                    print(
                        f"{label:22} run {run + 1}: caller spoke {1000 * cut.into_answer_s:4.0f} ms into the answer; "
                        f"AI silent at the caller {1000 * cut.stop_after_s:5.0f} ms after speech onset "
                        f"({result.clears} clear)",
                        flush=True,
                    )
            print(f"{label:22} median {1000 * statistics.median(stops):.0f} ms, worst {1000 * max(stops):.0f} ms\n")
        false_cuts = 0
        with running(create_app(settings(emulator.http_url))) as bridge:
            for noise_dbfs in (-60.0, -50.0, -45.0):
                for run in range(2):
                    said = probe.script(SPEECH, np.zeros(0, np.int16), 0.0, SECONDS, noise_dbfs, seed=10 + run)
                    false_cuts += asyncio.run(call(bridge.http_url, said)).clears
        print(f"line noise alone at -60/-50/-45 dBFS during the answer, 6 calls: {false_cuts} false barge-ins")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
