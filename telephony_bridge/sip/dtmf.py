"""RFC 4733 telephone events (spec §12), both directions, pure.

Receiving: events are keyed by (SSRC, timestamp) and a digit is reported **once, at its first packet** (start),
so the AI hears a key as soon as it is pressed; updates and the three redundant end copies are dropped. Events
that arrive from an SSRC other than the audio's (replayed captures, G13) are accepted: they never touch the
audio stream's state. Sending: ``event_payloads`` yields the packets of one key press the way RFC 4733 §2.5.1
wants them: updates with growing duration, then the end packet three times.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

EVENTS = "0123456789*#ABCD"
_PAYLOAD = struct.Struct("!BBH")
_REMEMBERED = 64


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    event: int
    end: bool
    volume: int
    duration: int

    @property
    def digit(self) -> str | None:
        return EVENTS[self.event] if 0 <= self.event < len(EVENTS) else None

    def to_bytes(self) -> bytes:
        return _PAYLOAD.pack(self.event, (0x80 if self.end else 0) | (self.volume & 0x3F), self.duration & 0xFFFF)


def parse_event(payload: bytes) -> TelephoneEvent | None:
    if len(payload) < 4:
        return None
    event, flags, duration = _PAYLOAD.unpack_from(payload)
    return TelephoneEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


class DtmfReceiver:
    """Turns telephone-event packets into digits, once each."""

    def __init__(self) -> None:
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.digits = 0

    def push(self, ssrc: int, timestamp: int, payload: bytes) -> str | None:
        event = parse_event(payload)
        if event is None or event.digit is None:
            return None
        key = (ssrc, timestamp)
        if key in self._seen:
            return None
        self._seen[key] = None
        while len(self._seen) > _REMEMBERED:
            self._seen.popitem(last=False)
        self.digits += 1
        return event.digit


def digit_event(digit: str) -> int:
    index = EVENTS.find(digit.upper())
    if index < 0 or not digit:
        raise ValueError(f"expected one of {EVENTS!r}, got {digit!r}")
    return index


def event_payloads(
    digit: str, *, duration_samples: int = 1280, step_samples: int = 160, volume: int = 10
) -> list[bytes]:
    """Payloads of one key press (default 160 ms): updates every ``step_samples``, then three end copies."""
    event = digit_event(digit)
    out = [
        TelephoneEvent(event, False, volume, d).to_bytes() for d in range(step_samples, duration_samples, step_samples)
    ]
    end = TelephoneEvent(event, True, volume, duration_samples).to_bytes()
    return [*out, end, end, end]
