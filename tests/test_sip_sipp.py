"""The bridge's SIP ingress against SIPp, the de-facto SIP load and conformance tool (Debian: sip-tester).

SIPp's built-in ``uac`` over UDP and TCP; our own scenarios in ``tests/data/sip/``: a PCMU call that plays RTP
from a pcap (generated here from seeded speech-band noise, 10 s) and must survive with its BYE answered, and a
CANCEL before answer; then 30 concurrent calls with no failure and no Savants limit broken. Under CI a
missing sipp fails the suite (never a silent skip).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from telephony_bridge.audio.codec import pcm16_to_ulaw
from telephony_bridge.serving import ServerThread
from telephony_bridge.sip.rtp import RtpPacket
from tests.support import emulator_stats, wait_until
from tests.test_end_to_end import speech_band_noise
from tests.test_sip_calls import assert_all_released, start_sip_bridge, status

DATA = Path(__file__).parent / "data" / "sip"


def sipp_binary() -> str:
    found = shutil.which("sipp")
    if found is None:
        message = "sipp is not installed (Debian package sip-tester)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def write_pcmu_pcap(path: Path, seconds: float) -> None:
    """An Ethernet pcap of 20 ms PCMU RTP packets, timestamps 20 ms apart (what SIPp's play_pcap_audio reads)."""
    ulaw = pcm16_to_ulaw(speech_band_noise(seconds, level_dbfs=-20.0))
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for i in range(len(ulaw) // 160):
        rtp = RtpPacket(0, 1000 + i, 160 * i, 0x1234ABCD, ulaw[160 * i : 160 * (i + 1)], marker=i == 0).to_bytes()
        udp = struct.pack("!HHHH", 40000, 40002, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0, bytes(4), bytes(4))
        frame = bytes(6) + bytes(6) + b"\x08\x00" + ip + udp
        usec = i * 20000
        out += struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000, len(frame), len(frame)) + frame
    path.write_bytes(bytes(out))


async def run_sipp(args: list[str], cwd: Path, timeout_s: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sipp_binary(),
        *args,
        "-nostdin",
        "-timeout",
        f"{int(timeout_s)}s",
        "-timeout_error",
        "-trace_err",
        cwd=cwd,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout_s + 15)
    return proc.returncode or 0, err.decode(errors="replace")[-2000:] + await asyncio.to_thread(_error_logs, cwd)


def _error_logs(cwd: Path) -> str:
    """The tail of SIPp's -trace_err file: the unexpected messages that failed a call."""
    return "".join(p.read_text(errors="replace")[-2000:] for p in cwd.glob("*_errors.log"))


def remote(bridge: ServerThread) -> str:
    return f"127.0.0.1:{status(bridge)['sip']['port']}"


@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_sipp_uac_over_udp_and_tcp(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, tmp_path: Path, transport: str
) -> None:
    sipp_binary()
    bridge = start_sip_bridge(start_bridge, emulator)
    code, log = await run_sipp(
        ["-sn", "uac", remote(bridge), "-t", transport, "-m", "2", "-l", "2", "-d", "2000", "-i", "127.0.0.1"],
        tmp_path,
        40,
    )
    assert code == 0, log
    assert_all_released(bridge, emulator)
    assert emulator_stats(emulator)["sessions_opened"] == 2


async def test_sipp_pcap_pcmu_call_survives_10_s_and_bye_is_answered(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, tmp_path: Path
) -> None:
    sipp_binary()
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.media_timeout_s": 3.0})
    pcap = tmp_path / "speech_pcmu.pcap"
    write_pcmu_pcap(pcap, 10.0)
    code, log = await run_sipp(
        [
            "-sf",
            str(DATA / "uac_pcmu_pcap.xml"),
            remote(bridge),
            "-key",
            "pcap",
            str(pcap),
            "-m",
            "1",
            "-i",
            "127.0.0.1",
        ],
        tmp_path,
        40,
    )
    assert code == 0, log  # the 200 to our BYE arrived: the call was still up after 10.5 s
    stats = emulator_stats(emulator)
    assert stats["sessions_opened"] == 1 and stats["violations"] == []
    assert_all_released(bridge, emulator)


async def test_sipp_cancel_before_answer_gets_487_and_frees_everything(
    start_bridge: Callable[..., ServerThread], start_emulator: Callable[..., ServerThread], tmp_path: Path
) -> None:
    sipp_binary()
    emulator = start_emulator(voice="echo", token_delay_s=1.5)  # admission is slow: the CANCEL wins the race
    bridge = start_sip_bridge(start_bridge, emulator)
    code, log = await run_sipp(
        ["-sf", str(DATA / "uac_cancel.xml"), remote(bridge), "-m", "1", "-i", "127.0.0.1"], tmp_path, 30
    )
    assert code == 0, log
    assert_all_released(bridge, emulator)
    wait_until(lambda: status(bridge)["accounting"]["devices"], 5.0, "accounting")
    assert emulator_stats(emulator)["sessions_opened"] == 0


async def test_sipp_30_concurrent_calls_all_succeed_within_savants_limits(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, tmp_path: Path
) -> None:
    sipp_binary()
    bridge = start_sip_bridge(start_bridge, emulator, **{"savants.device_ids": ["dev-a", "dev-b", "dev-c"]})
    code, log = await run_sipp(
        ["-sn", "uac", remote(bridge), "-m", "30", "-l", "30", "-r", "15", "-d", "6000", "-i", "127.0.0.1"],
        tmp_path,
        90,
    )
    assert code == 0, log  # SIPp exits 0 only when every call succeeded
    stats = emulator_stats(emulator)
    assert stats["sessions_opened"] == 30 and stats["violations"] == []
    assert_all_released(bridge, emulator)
