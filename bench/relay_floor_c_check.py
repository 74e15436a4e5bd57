"""bench/relay_floor_c.pyx carries a call's frames as bench/relay_floor.py does, byte for byte, so that ``relay-c``
and ``relay-picows`` (bench/capacity.py) do the same work: the same Savants messages from the same Twilio frames,
the same Twilio media messages from the same AI frames (behind relay_floor: the bridge's own reader, kernels and
message builder); and its fast path reads Twilio's messages, and nothing the bridge's reader would read otherwise.

Both kinds of listener are driven through ``on_ws_frame`` with picows' own WSTransport over a transport that
records, so what is compared is what would go on the wire (the Savants side masked, as a client's). Builds the
extension first if need be (bench/relay_c.py); bench/capacity.py runs this before it serves ``relay-c``.

    .venv/bin/python bench/relay_floor_c_check.py
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson
from picows import WSMsgType, WSTransport
from picows.picows import _make_test_ws_frame  # a frame over given bytes, as picows' own tests make them
from relay_c import load_or_explain  # bench/, beside this script
from relay_floor import CallSetup, RelayCall, SavantsLeg

from telephony_bridge.twilio.protocol import Media, media_audio

SID = "MZ0123456789abcdef0123456789abcdef"
ODD_SIDS = ('MZ"quoted\\', "MZ\u00e9\n\u2028")  # ones orjson escapes in the media message's head
FRAMES = 400  # per stream checked
MUTATIONS = 20_000


class Wire:
    """The asyncio transport under a WSTransport: it keeps what picows writes. Never drained, so that picows
    writes through ``write`` rather than to the socket."""

    def __init__(self) -> None:
        self.written = bytearray()

    def get_write_buffer_size(self) -> int:
        return 1

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str) -> Any:
        return _NoSocket() if name == "socket" else None

    def messages(self) -> list[tuple[int, bytes]]:
        """The frames written: (opcode, payload unmasked) each (RFC 6455 §5.2)."""
        data, at, frames = bytes(self.written), 0, []
        while at < len(data):
            opcode, size, masked = data[at] & 0x0F, data[at + 1] & 0x7F, data[at + 1] & 0x80
            at += 2
            if size >= 126:
                width = 2 if size == 126 else 8
                size, at = int.from_bytes(data[at : at + width], "big"), at + width
            mask = np.frombuffer(data[at : at + 4] if masked else bytes(4), dtype=np.uint8)
            at += 4 if masked else 0
            payload = np.frombuffer(data[at : at + size], dtype=np.uint8) ^ np.resize(mask, size)
            frames.append((opcode, payload.tobytes()))
            at += size
        return frames


class _NoSocket:
    def fileno(self) -> int:
        return -1


def wire_transport(client_side: bool) -> tuple[WSTransport, Wire]:
    wire = Wire()
    logger = logging.getLogger("relay_floor_c_check")
    return WSTransport(client_side, wire, logger, asyncio.get_running_loop()), wire


def caller_frames(rng: np.random.Generator) -> list[bytes]:
    """Twilio's text frames: mostly 20 ms of media in Twilio's shape; now and then another size (other base64
    paddings, other message lengths), the audio in another shape (the Python path, into the same filter state),
    non-canonical base64, or another event."""
    frames = []
    for i in range(FRAMES):
        size = 160 if rng.random() < 0.85 else int(rng.choice([0, 1, 2, 3, 80, 161, 320]))
        text = Media(SID, rng.integers(0, 256, size, dtype=np.uint8).tobytes(), i * 20, i + 1, i + 2).to_json()
        roll = rng.random()
        if roll < 0.05:  # keys sorted: not the scan's shape, still the bridge reader's
            frames.append(orjson.dumps(orjson.loads(text), option=orjson.OPT_SORT_KEYS))
        elif roll < 0.07:  # "AB==": 'B' sets bits base64 leaves unused (the Python path reads it, or not)
            frames.append(Media(SID, b"\x00", i * 20, i + 1, i + 2).to_json().replace("AA==", "AB==").encode())
        elif roll < 0.09:  # not audio: the call's Python half gets it
            frames.append(orjson.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "1"}}))
        else:
            frames.append(text.encode())
    return frames


def ai_frames(rng: np.random.Generator) -> list[bytes]:
    """The AI's binary frames: mostly 20 ms of PCM16 at 16 kHz; now and then another length (odd ones split a
    sample across frames), or full-scale square waves, which overshoot int16 when filtered (saturation)."""
    frames = []
    for _ in range(FRAMES):
        size = 320 if rng.random() < 0.85 else int(rng.choice([0, 1, 3, 160, 319, 321, 640]))
        if rng.random() < 0.2:
            samples = np.where(rng.random(size) < 0.5, -32768, 32767)
        else:
            samples = rng.integers(-32768, 32768, size)
        pcm = samples.astype("<i2").tobytes()
        frames.append(pcm[:-1] if rng.random() < 0.05 and pcm else pcm)
    return frames


def frame(kind: WSMsgType, payload: bytes) -> Any:
    return _make_test_ws_frame(kind, payload, True, False)


def check_caller_leg(extension: ModuleType, rng: np.random.Generator) -> int:
    """relay_floor's RelayCall and the compiled CallerLeg send the AI the same messages; returns how many."""
    frames = caller_frames(rng)
    python = RelayCall(None)  # type: ignore[arg-type]  # no relay: these frames open nothing
    python._upstream, python_wire = wire_transport(client_side=True)
    compiled = extension.CallerLeg(CallSetup(None))  # type: ignore[arg-type]
    compiled.upstream, compiled_wire = wire_transport(client_side=True)
    for text in frames:
        python.on_ws_frame(None, frame(WSMsgType.TEXT, text))
        compiled.on_ws_frame(None, frame(WSMsgType.TEXT, text))
    sent = same(compiled_wire.messages(), python_wire.messages(), WSMsgType.BINARY, "caller leg")
    twilio = [text for text in frames if text.startswith(b'{"event":"media","sequenceNumber"')]
    missed = [text for text in twilio if b'"AB==' not in text and extension.twilio_audio(text) is None]
    assert not missed, f"the fast path did not read Twilio's own message {missed[0][:120]!r}..."
    return sent


def check_ai_leg(extension: ModuleType, rng: np.random.Generator, stream_sid: str) -> int:
    """relay_floor's SavantsLeg and the compiled one send the caller the same messages; returns how many."""
    frames = ai_frames(rng)
    python = SavantsLeg(None, stream_sid)  # type: ignore[arg-type]  # no call: these frames end nothing
    python.downstream, python_wire = wire_transport(client_side=False)
    compiled = extension.SavantsLeg(SavantsLeg(None, stream_sid))  # type: ignore[arg-type]
    compiled.downstream, compiled_wire = wire_transport(client_side=False)
    for pcm in frames:
        python.on_ws_frame(None, frame(WSMsgType.BINARY, pcm))
        compiled.on_ws_frame(None, frame(WSMsgType.BINARY, pcm))
    return same(compiled_wire.messages(), python_wire.messages(), WSMsgType.TEXT, f"AI leg ({stream_sid!r})")


def same(sent: list[tuple[int, bytes]], expected: list[tuple[int, bytes]], kind: WSMsgType, leg: str) -> int:
    """How many messages the compiled leg sent, once they are relay_floor's (all of kind ``kind``), byte for byte."""
    for i, (ours, theirs) in enumerate(zip(sent, expected, strict=False)):
        assert ours == theirs, f"{leg}: message {i} differs from relay_floor's: {ours[1][:80]!r} != {theirs[1][:80]!r}"
    assert len(sent) == len(expected), f"{leg}: {len(sent)} messages, relay_floor {len(expected)}"
    assert sent and {opcode for opcode, _ in sent} == {kind}, f"{leg}: no messages, or not all {kind.name}"
    return len(sent)


def check_reader(extension: ModuleType, rng: np.random.Generator) -> tuple[int, int]:
    """Whatever the fast path reads, the bridge's reader (``media_audio``) reads the same audio from; shapes it
    must leave to the Python path, it does. Returns (texts tried, texts the fast path read)."""
    twilio = (
        b'{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"0",'
        b'"payload":"AAAA"},"streamSid":"MZ1"}'
    )
    assert extension.twilio_audio(twilio) == bytes(3)
    refused = [  # Twilio's shape, one thing changed: (what, into what)
        (b'"event":"media"', b'"event": "media"'),
        (b'"sequenceNumber":"1"', b'"sequenceNumber":"1234567890123456789"'),  # 19 digits
        (b'"chunk":"1"', b'"chunk":""'),
        (b'"track":"inbound"', b'"track":"outbound"'),
        (b'"AAAA"', b'"AAA"'),  # not padded
        (b'"AAAA"', b'"AB=="'),  # not canonical
        (b'"MZ1"', b'"MZ\\u0031"'),  # an escape
        (b'"MZ1"}', b'"MZ1"}\n'),  # white space after
    ]
    for was, now in refused:
        text = twilio.replace(was, now)
        assert extension.twilio_audio(text) is None, f"the fast path read {text!r}"
    audio = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 1, 2, 160)]
    texts = [Media(SID, ulaw, 20, 2, 3).to_json().encode() for ulaw in audio]
    for text in texts:  # Twilio's own: the fast path reads them, as the bridge does
        assert extension.twilio_audio(text) == media_audio(text)[0], f"the fast path did not read {text!r}"
    texts += [Media(sid, b"\x00", 10**17, 1, 9).to_json().encode() for sid in ODD_SIDS]  # escaped: Python's
    alphabet = np.frombuffer(b'"\\=,:{} 0123456789AZaz+/\x00\x1f\x7f\x80\xc3\xa9', dtype=np.uint8)
    read = 0
    for i in range(MUTATIONS):  # one byte replaced, deleted or inserted
        text = bytearray(texts[i % len(texts)])
        at, change = int(rng.integers(0, len(text))), int(rng.integers(0, 3))
        if change == 0:
            text[at] = int(rng.choice(alphabet))
        elif change == 1:
            del text[at]
        else:
            text.insert(at, int(rng.choice(alphabet)))
        fast = extension.twilio_audio(bytes(text))
        if fast is not None:
            read += 1
            bridge = media_audio(bytes(text))
            assert bridge is not None and bridge[0] == fast, f"the fast path read {bytes(text)!r} otherwise"
    return MUTATIONS, read


async def check(extension: ModuleType) -> str:
    """All three checks, in a running event loop (picows' transports and relay_floor's legs want one): what held."""
    rng = np.random.default_rng(20261206)
    up = check_caller_leg(extension, rng)
    down = [check_ai_leg(extension, rng, sid) for sid in (SID, *ODD_SIDS)]
    tried, read = check_reader(extension, rng)
    return (
        f"{up} Savants messages and {sum(down)} media messages ({len(down)} stream SIDs) byte for byte as "
        f"relay_floor's; the fast path read {read} of {tried} mutated messages, each as the bridge's reader"
    )


def main() -> int:
    extension = load_or_explain("relay_floor_c_check")
    if extension is None:
        return 1
    print(f"relay_floor_c_check: {Path(extension.__file__).name}: {asyncio.run(check(extension))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
