"""The simulated caller: plays Twilio for one call against a bridge's media-stream WebSocket.

It speaks the way Twilio does (spec: twilio-media-streams.md §3): ``connected``, ``start`` with realistic
SIDs and ``customParameters``, then a 160-byte μ-law ``media`` every 20 ms on an absolute schedule, with
``sequenceNumber``, ``chunk`` and ``timestamp`` as strings. It listens the way Twilio does (§4): every
message the bridge sends is read strictly (anything Twilio would log as 31950/31951 is a violation), audio
goes through the playout model of ``twilio_playout`` on the same 20 ms clock, and marks are echoed when
playback reaches them or a ``clear`` flushes them. What played is what the caller "heard".

The call ends when ``seconds`` have passed since ``start`` (we send ``stop`` and close, as a caller hanging
up does) or when the bridge closes the socket.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from telephony_bridge.audio.codec import (
    TWILIO_BYTES_PER_MS,
    TWILIO_FRAME_BYTES,
    ULAW_SILENCE,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)
from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.tools.round_trips import RoundTrips
from telephony_bridge.tools.twilio_playout import Playout
from telephony_bridge.twilio.outbound_messages import OutClear, OutMark, OutMedia, parse_outbound
from telephony_bridge.twilio.protocol import (
    Connected,
    Dtmf,
    Malformed,
    Mark,
    Media,
    Start,
    Stop,
)

logger = logging.getLogger(__name__)

_Numbered = Start | Media | Dtmf | Mark | Stop

FRAME_S = 0.020
DTMF_DIGITS = frozenset("0123456789*#")
# A 20 ms frame is "audio" when a sample exceeds about -50 dBFS; μ-law's smallest steps (±8) are not speech.
AUDIBLE_PEAK = 100


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two-letter prefix and 32 lowercase hex digits (34 characters, §3)."""
    return prefix + secrets.token_hex(16)


@dataclass(frozen=True, eq=False)
class CallConfig:
    """One simulated call. SIDs left as ``None`` are random per call."""

    url: str
    audio_in: npt.NDArray[np.int16] | None = None  # what the caller says, int16 at 8 kHz; silence after
    seconds: float = 10.0  # hang up this long after ``start``
    custom_parameters: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # extra upgrade headers (e.g. a signature)
    clock: Clock = field(default_factory=SystemClock)
    start_delay_s: float = 0.0  # between ``connected`` and ``start``; Twilio sends them back to back
    dtmf: Sequence[tuple[float, str]] = ()  # (seconds after start, digit)
    open_timeout_s: float = 10.0
    close_timeout_s: float = 5.0
    account_sid: str | None = None
    call_sid: str | None = None
    stream_sid: str | None = None

    def __post_init__(self) -> None:
        if self.audio_in is not None and (self.audio_in.dtype != np.int16 or self.audio_in.ndim != 1):
            raise ValueError(f"audio_in must be mono int16, got {self.audio_in.dtype} with shape {self.audio_in.shape}")
        if not self.seconds > 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if self.start_delay_s < 0:
            raise ValueError(f"start_delay_s must not be negative, got {self.start_delay_s}")
        for at_s, digit in self.dtmf:
            if digit not in DTMF_DIGITS or at_s < 0:
                raise ValueError(f"dtmf entries must be (seconds >= 0, one of 0-9 * #), got {(at_s, digit)!r}")


@dataclass
class CallResult:
    """What one call looked like from the caller's side. Times are seconds after ``start`` was sent."""

    call_sid: str
    stream_sid: str
    heard: npt.NDArray[np.int16]  # everything played to the caller, silence included, 8 kHz
    first_audio_s: float | None  # first audible media received from the bridge
    first_heard_s: float | None  # first audible frame played (after Twilio's buffer)
    heard_s: float  # audible audio played, in 20 ms frames
    violations: list[str]
    marks_echoed: list[str]  # names, in the order we echoed them
    clears: int
    max_lead_ms: float  # most audio the bridge had queued ahead of playback
    underruns: int  # short holes in playback: the bridge fell behind real time (see ``Playout``)
    round_trips_s: list[float]  # per AI media message: arrival minus when the caller sent its first sample
    # Per AI media message: when its first sample was played, less when the caller sent it, both on the caller's
    # 20 ms beat (so multiples of 20 ms): the delay the caller hears, after the playback buffer has smoothed out
    # arrival jitter and including every hole it could not (see ``tools.round_trips``).
    heard_round_trips_s: list[float]
    underrun_ms: float
    cut_off_ms: float  # audio still buffered when the call ended: sent, never heard (G8)
    received_ms: float  # all the audio the bridge sent, heard or cut off
    media_sent: int
    late_messages: int  # arrived after our ``stop``: crossed it on the wire, not counted as violations
    ended_by: Literal["caller", "bridge"]
    close_code: int | None
    duration_s: float
    # For each underrun, when playback resumed after it, in seconds of the caller's beat from its first frame: a
    # load tells the holes in its set-up ramp from those once every call is up.
    underrun_ends_s: tuple[float, ...] = ()
    started_at: float | None = None  # when ``start`` was sent, on the caller's clock's ``monotonic``
    # Ticks of the caller's own beat that ran more than a frame late, in seconds of the beat: its process stalled.
    # The ticks due meanwhile then play at once, faster than real time, so an underrun soon after one may be the
    # caller's, not the bridge's.
    beat_stalls_s: tuple[float, ...] = ()

    def summary(self) -> str:
        """One line: time to first audio, audio heard, protocol violations."""

        def at(seconds: float | None) -> str:
            return "never" if seconds is None else f"{seconds:.3f} s"

        line = (
            f"call {self.call_sid} ended by {self.ended_by} after {self.duration_s:.2f} s "
            f"(close code {self.close_code}): first audio received {at(self.first_audio_s)}, "
            f"heard {at(self.first_heard_s)}; {self.heard_s:.2f} s heard, max lead {self.max_lead_ms:.0f} ms, "
            f"{self.underruns} underruns ({self.underrun_ms:.0f} ms), {self.cut_off_ms:.0f} ms cut off, "
            f"{len(self.marks_echoed)} marks echoed, {self.clears} clears; "
            f"{len(self.violations)} protocol violations"
        )
        return line + (f" (first: {self.violations[0]})" if self.violations else "")


class SimulatedCall:
    """Drives one call; ``run()`` once. The send side and the receive side share one sequence counter."""

    def __init__(self, config: CallConfig) -> None:
        self.config = config
        self.account_sid = config.account_sid or new_sid("AC")
        self.call_sid = config.call_sid or new_sid("CA")
        self.stream_sid = config.stream_sid or new_sid("MZ")
        self._clock = config.clock
        self._ulaw_in = pcm16_to_ulaw(config.audio_in) if config.audio_in is not None else b""
        self._playout = Playout()
        self._send_lock = asyncio.Lock()  # a sequence number is taken and sent in one step
        self._seq = 0
        self._started_at: float | None = None
        self._stopped = False
        self._heard = bytearray()
        self._first_audio_s: float | None = None
        self._first_heard_s: float | None = None
        self._violations: list[str] = []
        self._marks_echoed: list[str] = []
        self._media_sent = 0
        self._beat_stalls_s: list[float] = []
        self._round_trips = RoundTrips(self._playout)
        self._late_messages = 0
        self._ended_by: Literal["caller", "bridge"] = "caller"
        self._ended_at: float | None = None

    async def run(self) -> CallResult:
        """Place the call and return what happened.

        Raises ``OSError``, ``TimeoutError`` or a ``websockets`` ``InvalidHandshake``/``InvalidURI`` when the
        bridge cannot be reached or refuses the upgrade; everything after the handshake is in the result.
        """
        cfg = self.config
        async with connect(
            cfg.url,
            additional_headers=dict(cfg.headers) or None,
            compression=None,
            proxy=None,
            ping_interval=None,
            open_timeout=cfg.open_timeout_s,
            close_timeout=cfg.close_timeout_s,
        ) as ws:
            await ws.send(Connected().to_json())
            async with asyncio.TaskGroup() as tg:
                talker = tg.create_task(self._talk(ws))
                tg.create_task(self._listen(ws, talker))
            close_code = ws.close_code
        return self._result(close_code)

    async def _talk(self, ws: ClientConnection) -> None:
        """Send ``start``, then one frame every 20 ms from an absolute schedule; play out on the same beat."""
        cfg = self.config
        try:
            if cfg.start_delay_s:
                await self._clock.sleep_until(self._clock.monotonic() + cfg.start_delay_s)
            params = dict(cfg.custom_parameters)
            await self._send(
                ws, partial(Start, self.stream_sid, self.call_sid, self.account_sid, custom_parameters=params)
            )
            t0 = self._started_at = self._clock.monotonic()
            n_frames = round(cfg.seconds / FRAME_S)
            dtmf = sorted(cfg.dtmf)
            for i in range(n_frames + 1):
                await self._clock.sleep_until(t0 + i * FRAME_S)
                if self._clock.monotonic() - (t0 + i * FRAME_S) > FRAME_S:
                    self._beat_stalls_s.append(i * FRAME_S)
                # The last tick plays nothing: it only releases marks whose audio finished with the call.
                await self._play(ws, 0 if i == n_frames else TWILIO_FRAME_BYTES, i)
                if i == n_frames:
                    break
                while dtmf and dtmf[0][0] <= i * FRAME_S + 1e-9:
                    await self._send(ws, partial(Dtmf, self.stream_sid, dtmf.pop(0)[1]))
                # timestamp: ms since the stream started; chunk counts from 1 (§3)
                await self._send(ws, partial(Media, self.stream_sid, self._frame(i), i * 20, i + 1))
                self._round_trips.sent_at.append(self._clock.monotonic())
                self._media_sent += 1
            await self._send(ws, partial(Stop, self.stream_sid, self.call_sid, self.account_sid), stop=True)
            self._ended_at = self._clock.monotonic()
            await ws.close()
        except ConnectionClosed:
            return  # the bridge closed first; ``_listen`` records it

    async def _listen(self, ws: ClientConnection, talker: asyncio.Task[None]) -> None:
        try:
            async for message in ws:
                await self._receive(ws, message)
        except ConnectionClosed:
            pass
        if not self._stopped:
            self._ended_by = "bridge"
            self._ended_at = self._clock.monotonic()
            talker.cancel()

    async def _receive(self, ws: ClientConnection, message: str | bytes) -> None:
        """Handle one message from the bridge as Twilio would, echoing the marks it makes due at once."""
        if self._stopped:
            self._late_messages += 1
            return
        if self._started_at is None:
            self._violation(f"message before 'start' (31951): {message[:60]!r}")
            return
        event = parse_outbound(message, self.stream_sid)
        if isinstance(event, Malformed):
            self._violation(event.reason)
        elif isinstance(event, OutMedia):
            self._round_trips.received(event.payload, self._clock.monotonic())
            self._playout.push_media(event.payload)
            if self._first_audio_s is None and _audible(ulaw_to_pcm16(event.payload)):
                self._first_audio_s = self._clock.monotonic() - self._started_at
        elif isinstance(event, OutMark):
            for name in self._playout.push_mark(event.name):
                await self._echo(ws, name)
        elif isinstance(event, OutClear):
            for name in self._playout.clear():
                await self._echo(ws, name)

    async def _play(self, ws: ClientConnection, n_bytes: int, tick: int) -> None:
        audio, due = self._playout.tick(n_bytes)
        self._round_trips.played(tick)
        if n_bytes:
            self._heard += audio
            if self._first_heard_s is None and self._started_at is not None and _audible(ulaw_to_pcm16(audio)):
                self._first_heard_s = self._clock.monotonic() - self._started_at
        for name in due:
            await self._echo(ws, name)

    async def _echo(self, ws: ClientConnection, name: str) -> None:
        if await self._send(ws, partial(Mark, self.stream_sid, name)):
            self._marks_echoed.append(name)

    async def _send(self, ws: ClientConnection, make: Callable[[int], _Numbered], *, stop: bool = False) -> bool:
        """Number (``make(sequence_number)``) and send one message; nothing goes out after ``stop``.

        ``sequenceNumber`` is 1 on ``start`` and counts every later message of any type (§3).
        Returns whether the message went.
        """
        async with self._send_lock:
            if self._stopped:
                return False
            self._seq += 1
            self._stopped = stop
            await ws.send(make(self._seq).to_json())
            return True

    def _frame(self, i: int) -> bytes:
        chunk = self._ulaw_in[i * TWILIO_FRAME_BYTES : (i + 1) * TWILIO_FRAME_BYTES]
        return chunk + bytes([ULAW_SILENCE]) * (TWILIO_FRAME_BYTES - len(chunk))

    def _violation(self, reason: str) -> None:
        logger.debug("protocol violation on %s: %s", self.stream_sid, reason)
        self._violations.append(reason)

    def _result(self, close_code: int | None) -> CallResult:
        heard = ulaw_to_pcm16(bytes(self._heard))
        frames = heard[: len(heard) // TWILIO_FRAME_BYTES * TWILIO_FRAME_BYTES].reshape(-1, TWILIO_FRAME_BYTES)
        audible_frames = int(
            np.count_nonzero((frames.max(axis=1) > AUDIBLE_PEAK) | (frames.min(axis=1) < -AUDIBLE_PEAK))
        )
        started, ended = self._started_at, self._ended_at
        return CallResult(
            call_sid=self.call_sid,
            stream_sid=self.stream_sid,
            heard=heard,
            first_audio_s=self._first_audio_s,
            first_heard_s=self._first_heard_s,
            heard_s=audible_frames * FRAME_S,
            violations=list(self._violations),
            marks_echoed=list(self._marks_echoed),
            clears=self._playout.clears,
            max_lead_ms=self._playout.max_lead_ms,
            underruns=self._playout.underruns,
            round_trips_s=list(self._round_trips.arrivals_s),
            heard_round_trips_s=list(self._round_trips.heard_s),
            underrun_ms=self._playout.underrun_ms,
            underrun_ends_s=tuple(ms / 1000 for ms in self._playout.underrun_ends_ms),
            beat_stalls_s=tuple(self._beat_stalls_s),
            started_at=self._started_at,
            cut_off_ms=self._playout.buffered_bytes / TWILIO_BYTES_PER_MS,
            received_ms=self._playout.bytes_received / TWILIO_BYTES_PER_MS,
            media_sent=self._media_sent,
            late_messages=self._late_messages,
            ended_by=self._ended_by,
            close_code=close_code,
            duration_s=(ended - started) if started is not None and ended is not None else 0.0,
        )


def _audible(pcm: npt.NDArray[np.int16]) -> bool:
    return bool(pcm.size) and (int(pcm.max()) > AUDIBLE_PEAK or int(pcm.min()) < -AUDIBLE_PEAK)


async def run_call(config: CallConfig) -> CallResult:
    """Place one simulated call (see ``SimulatedCall.run`` for what it raises)."""
    return await SimulatedCall(config).run()


def __getattr__(name: str) -> object:
    """``read_wav``, ``write_wav`` and ``call_command`` moved to ``tools.commands`` (they drive this module,
    it does not need them); they stay importable from here for existing callers."""
    if name in {"read_wav", "write_wav", "call_command"}:
        from telephony_bridge.tools import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
