"""Lean simulated Twilio callers for bench/capacity.py (``--callers lean``): the same calls as
``tools.caller.SimulatedCall``, at a fraction of its CPU, so the load's core stops being the limit of a
one-core knee (``--server-cpus 0``).

    .venv/bin/python bench/lean_callers.py --compare --calls 20 --seconds 8 [--server relay-picows]

Each call is Twilio's whole flow (``twilio_flow.run_flow``: the signed ``/voice`` webhook, the stream URL and
``<Parameter>``s from its TwiML, the ``<Connect action>`` afterwards); only the media stream is played here:
``connected``, ``start``, a ``media`` every 20 ms on an absolute schedule with ``timestamp``, ``chunk`` and a
``sequenceNumber`` counting every message sent, marks echoed when ``Playout`` has played their audio, ``stop``
after ``seconds``, then close (spec: twilio-media-streams.md §3, §4). What makes it cheap:

- one process-wide timer (``Beat``) drives every call: no task per call, no wake-up per call per frame;
- the socket is picows (as the bridge's legs are), its frames read in its callback;
- a ``media`` message is one ``bytes %`` of a per-call template with the frame's base64, encoded once per run
  (bench/lean_wire.py, like the reader below);
- what the bridge sends is read with one typed msgspec pass, as strictly as ``parse_outbound`` reads it (exactly
  the documented fields, valid base64, this stream's ``streamSid``: tests hold the two readers equal);
- ``--callers compiled`` (``CompiledCall``): the same call with its per-frame work in C (bench/lean_callers_c.pyx:
  the beat's tick, the bridge's ``media`` messages, ``Playout`` and ``RoundTrips``), the rest shared with
  ``LeanCall`` (``_CallEnds``).

The figures keep ``SimulatedCall``'s meaning (``CallResult``, so ``LoadResult`` and capacity.py read them
unchanged), with these simplifications:

- ``heard`` is empty: nothing keeps what was played (``heard_s`` and ``first_heard_s`` are still counted);
- a call's frames go out on its phase of the beat: ``PHASES`` phases 1 ms apart, each call on the least
  used one, its ``start`` on its first tick with frame 0 (so up to 20 ms after ``connected``) and every time in
  the result counted from there, as ``SimulatedCall`` counts from its ``start``;
- a message split over frames is a violation (Twilio would join it; the bridge never splits one);
- no DTMF, no ``start_delay_s``, no backpressure (the bridge reads all the time); time is the event loop's clock
  (``CallConfig.clock`` is not used).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cython_build  # bench/, beside this script
import numpy as np
import numpy.typing as npt
import orjson
from lean_wire import (  # bench/, beside this script
    SILENCE_B64,
    audible,
    encode_frames,
    mark_template,
    media_template,
    read_outbound,
)
from picows import WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from telephony_bridge.audio.codec import TWILIO_BYTES_PER_MS, TWILIO_FRAME_BYTES
from telephony_bridge.close_codes import echo_code
from telephony_bridge.tools.caller import FRAME_S, CallConfig, CallResult, new_sid
from telephony_bridge.tools.round_trips import RoundTrips
from telephony_bridge.tools.twilio_playout import Playout
from telephony_bridge.twilio.outbound_messages import MediaMessages, OutClear, OutMark, OutMedia
from telephony_bridge.twilio.protocol import Connected, Start, Stop

# A call's frames go out on one of these evenly spaced points of the 20 ms beat: 1 ms apart, as finely as the
# emulator's and bench/lean_ai.py's timers fire (Twilio's calls start at any moment, so their frames reach the
# bridge spread over the beat).
PHASES = 20
# What bunches the bridge's arrivals more is the number of load processes: at 100 calls on a core of its own the
# bridge woke 8 times a call-second with 2 (4 phases or 20 alike), 17 with 4, and 19-23 under the full callers.
# Fewer wake-ups would flatter the bridge, so capacity.py runs these callers in this many processes by default.
LOAD_PROCS = 4
NO_STATUS = 1005  # a close frame without a code (RFC 6455 §7.1.5)
ABNORMAL_CLOSURE = 1006  # no close frame at all, as the websockets library reports it
_TEXT, _BINARY, _CLOSE, _PING, _PONG = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE, WSMsgType.PING, WSMsgType.PONG
_picows_log = logging.getLogger("picows.client")
BENCH = Path(__file__).resolve().parent

# --- one call, and the beat that drives them all -----------------------------------------------------------------


class Ticking(Protocol):
    def tick(self, due: float, now: float) -> bool:
        """Play and send what is due (``LeanCall.tick``); False once the call needs no more ticks."""
        ...


class _CallEnds:
    """What both kinds of call do in Python (``LeanCall``, ``CompiledCall``): set-up, ``start`` and ``stop``,
    marks, reading the bridge's messages (every one for ``LeanCall``; for ``CompiledCall`` all but the media
    messages its C reads), the close, and the result. ``Beat`` calls ``tick`` on the call's phase; ``result()``
    once the connection is gone."""

    _transport: WSTransport | None
    _seq: int
    _stopped: bool
    _gone: bool
    _started_at: float | None

    def _setup(
        self, config: CallConfig, frames: list[bytes], beat: Beat, models: tuple[type, type] = (Playout, RoundTrips)
    ) -> None:
        """The call's state; ``models``: its playback and round-trip models (the C ones for ``CompiledCall``)."""
        self.config = config
        self.account_sid = config.account_sid or new_sid("AC")
        self.call_sid = config.call_sid or new_sid("CA")
        self.stream_sid = config.stream_sid or new_sid("MZ")
        self._beat = beat
        self._time = time.monotonic  # the figures' clock, as ``SystemClock``'s; the schedule is the loop's
        self._frames = frames
        self._media = media_template(self.stream_sid)
        self._mark = mark_template(self.stream_sid)
        self._n_frames = round(config.seconds / FRAME_S)
        self._transport = None
        self._playout = playout = models[0]()
        self._round_trips = models[1](playout)
        self._seq = 0
        self._t0 = 0.0  # the beat's time of frame 0; frame i is due at t0 + i * FRAME_S
        self._next = 0  # the next frame to play and send
        self._started_at = None
        self._stopped = False  # ``stop`` sent: nothing more goes out
        self._gone = False  # the bridge's close frame came, or the connection is gone
        self._close_timer: asyncio.TimerHandle | None = None
        self.disconnected: asyncio.Future[None] = beat.loop.create_future()
        self._audible_frames = 0
        self._first_audio_s: float | None = None
        self._first_heard_s: float | None = None
        self._violations: list[str] = []
        self._marks_echoed: list[str] = []
        self._late_messages = 0
        self._ended_by: Literal["caller", "bridge"] = "caller"
        self._ended_at: float | None = None
        self._close_code: int | None = None

    def _begin(self, due: float) -> None:
        """``start``, on the first tick: frame 0 is due at ``due``."""
        assert self._transport is not None
        start = Start(
            self.stream_sid, self.call_sid, self.account_sid, custom_parameters=dict(self.config.custom_parameters)
        )
        self._seq = 1
        self._transport.send(_TEXT, start.to_json().encode())
        self._t0, self._started_at = due, self._time()

    def _echo(self, name: str) -> None:
        if self._stopped or self._gone or self._transport is None:
            return
        self._seq += 1
        self._transport.send(_TEXT, self._mark % (self._seq, orjson.dumps(name)))
        self._marks_echoed.append(name)

    def _stop(self, transport: WSTransport) -> None:
        """``stop``, then our close frame; the connection goes when the bridge answers or after the close
        timeout, as ``websockets``' ``close()`` does for ``SimulatedCall``."""
        self._seq += 1
        transport.send(_TEXT, Stop(self.stream_sid, self.call_sid, self.account_sid, self._seq).to_json().encode())
        self._stopped = True
        self._ended_at = self._time()
        transport.send_close(WSCloseCode.OK)
        self._close_timer = self._beat.loop.call_later(self.config.close_timeout_s, transport.disconnect, False)

    # --- picows callbacks: run as data arrives; never raise -------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport

    def _other_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """A frame that is not a whole text message."""
        kind = frame.msg_type
        if kind is _CLOSE:
            self._close_code = int(frame.get_close_code()) or NO_STATUS
            self._bridge_ended()
            self._gone = True
            if not transport.is_close_frame_sent:
                transport.send_close(echo_code(self._close_code))  # RFC 6455 §5.5.1
            transport.disconnect()
        elif kind is not _PING and kind is not _PONG:  # pings: picows answers
            self._unreadable("binary frame (Twilio error 31950)" if kind is _BINARY else "fragmented message")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._bridge_ended()
        self._gone = True
        if self._close_code is None:
            self._close_code = ABNORMAL_CLOSURE
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.disconnected.done():
            self.disconnected.set_result(None)

    # --- what the bridge sends -----------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        """One text message, as ``SimulatedCall._receive`` handles it."""
        if self._stopped:
            self._late_messages += 1
            return
        if self._started_at is None:
            self._violation(f"message before 'start' (31951): {data[:60]!r}")
            return
        event = read_outbound(data, self.stream_sid)
        playout = self._playout
        if type(event) is OutMedia:
            payload = event.payload
            self._round_trips.received(payload, self._time())
            playout.push_media(payload)
            if self._first_audio_s is None and audible(payload):
                self._first_audio_s = self._time() - self._started_at
        elif type(event) is OutMark:
            for name in playout.push_mark(event.name):
                self._echo(name)
        elif type(event) is OutClear:
            for name in playout.clear():
                self._echo(name)
        else:
            self._violation(event.reason)

    def _unreadable(self, reason: str) -> None:
        if self._stopped:
            self._late_messages += 1
        else:
            self._violation(reason)

    def _violation(self, reason: str) -> None:
        self._violations.append(reason)

    def _bridge_ended(self) -> None:
        if not self._stopped and not self._gone:
            self._ended_by = "bridge"
            self._ended_at = self._time()

    def result(self) -> CallResult:
        started, ended = self._started_at, self._ended_at
        return CallResult(
            call_sid=self.call_sid,
            stream_sid=self.stream_sid,
            heard=np.empty(0, dtype=np.int16),
            first_audio_s=self._first_audio_s,
            first_heard_s=self._first_heard_s,
            heard_s=self._audible_frames * FRAME_S,
            violations=list(self._violations),
            marks_echoed=list(self._marks_echoed),
            clears=self._playout.clears,
            max_lead_ms=self._playout.max_lead_ms,
            underruns=self._playout.underruns,
            round_trips_s=self._round_trips.arrivals_s,
            heard_round_trips_s=self._round_trips.heard_s,
            underrun_ms=self._playout.underrun_ms,
            underrun_ends_s=tuple(ms / 1000 for ms in self._playout.underrun_ends_ms),
            started_at=self._started_at,
            cut_off_ms=self._playout.buffered_bytes / TWILIO_BYTES_PER_MS,
            received_ms=self._playout.bytes_received / TWILIO_BYTES_PER_MS,
            media_sent=len(self._round_trips.sent_at),
            late_messages=self._late_messages,
            ended_by=self._ended_by,
            close_code=self._close_code,
            duration_s=(ended - started) if started is not None and ended is not None else 0.0,
        )


class LeanCall(_CallEnds, WSListener):  # type: ignore[misc]
    """One call's media stream and its figures in Python; the picows listener of its connection."""

    def __init__(self, config: CallConfig, frames: list[bytes], beat: Beat) -> None:
        self._setup(config, frames, beat)

    def tick(self, due: float, now: float) -> bool:
        """Play and send every frame due by ``now`` (more than one only when the loop ran late: the schedule is
        absolute), ``start`` with the first, which is due at ``due``; both on the loop's clock. Returns False
        once the call needs no more ticks."""
        transport = self._transport
        if self._gone or transport is None:
            return False
        if self._started_at is None:
            self._begin(due)
        playout, frames, media, sent_at = self._playout, self._frames, self._media, self._round_trips.sent_at
        i, last = self._next, self._n_frames
        while i <= last and self._t0 + i * FRAME_S <= now + 1e-6:
            # The last tick plays nothing: it only releases marks whose audio finished with the call.
            n_bytes = 0 if i == last else TWILIO_FRAME_BYTES
            audio, marks = playout.tick(n_bytes)
            self._round_trips.played(i)
            if n_bytes and audible(audio):
                self._audible_frames += 1
                if self._first_heard_s is None:
                    self._first_heard_s = self._time() - self._started_at
            for name in marks:
                self._echo(name)
            if i == last:
                self._stop(transport)
                return False
            self._seq += 1
            # timestamp: ms since the stream started; chunk counts from 1 (§3)
            transport.send(_TEXT, media % (self._seq, i + 1, i * 20, frames[i] if i < len(frames) else SILENCE_B64))
            sent_at.append(self._time())
            i += 1
        self._next = i
        return True

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is _TEXT and frame.fin:
            self._receive(frame.get_payload_as_bytes())
        else:
            self._other_frame(transport, frame)


def compiled_call_class() -> type:
    """``CompiledCall``: ``LeanCall`` with its hot half from bench/lean_callers_c.pyx (built on first use:
    bench/cython_build.py), once a process. Raises ``cython_build.BuildError`` if it cannot be built."""
    global _compiled_call
    if _compiled_call is None:
        core = cython_build.load(BENCH / "lean_callers_c.pyx")

        class CompiledCall(_CallEnds, core.CallCore):  # type: ignore[misc,name-defined]
            """``LeanCall`` with ``tick`` and the bridge's ``media`` messages in C (``CallCore``), and the C
            ``Playout`` and ``RoundTrips``: the same messages out and the same figures."""

            def __init__(self, config: CallConfig, frames: list[bytes], beat: Beat) -> None:
                self._setup(config, frames, beat, (core.Playout, core.RoundTrips))
                self._media_head = MediaMessages(self.stream_sid)._head

        _compiled_call = CompiledCall
    return _compiled_call


_compiled_call: type | None = None


class Stalls(NamedTuple):
    """A beat's stalls (``Beat.late_at``, ``Beat.worst_late_s``), as a load process hands them back."""

    at: list[float]
    worst_s: float


class Beat:
    """The process's one timer: every ``FRAME_S / phases`` it ticks the calls on that phase of the 20 ms beat,
    on an absolute schedule; it stops while no call is up. A new call joins the least used phase.

    ``late_at``: when (``time.monotonic``) the beat stalled: a tick ran more than a frame after it was due. Its
    calls' audio went out that late, and a bridge in front hears it, 200 ms on, as the AI's frames coming late
    (the echo says the audio back): holes that are the load's, not the bridge's (docs/performance.md). One entry
    a stall, at its first late tick: the ticks due meanwhile run late one after another as the beat catches up
    (one a millisecond with 20 phases), and counting each would count one stall many times. ``worst_late_s``:
    the most any tick ran late, over the whole run (kept from the first stall on: 0 while the beat never stalled)."""

    def __init__(self, phases: int = PHASES) -> None:
        self.loop = asyncio.get_running_loop()
        self._phases: list[list[Ticking]] = [[] for _ in range(phases)]
        self._step_s = FRAME_S / phases
        self._base = self.loop.time()
        self._k = 0  # the next tick: at base + k * step, for phase k % phases
        self._handle: asyncio.TimerHandle | None = None
        self.late_at: list[float] = []
        self.worst_late_s = 0.0
        self._stalled = False  # the last tick ran more than a frame late

    def add(self, call: Ticking) -> None:
        min(self._phases, key=len).append(call)
        if self._handle is None:
            self._k = int((self.loop.time() - self._base) / self._step_s) + 1
            self._handle = self.loop.call_at(self._base + self._k * self._step_s, self._tick)

    def discard(self, call: Ticking) -> None:
        for phase in self._phases:
            if call in phase:
                phase.remove(call)

    def _tick(self) -> None:
        k = self._k
        due = self._base + k * self._step_s
        phase = self._phases[k % len(self._phases)]
        if phase:
            now = self.loop.time()
            late = now - due > FRAME_S
            if late:
                if not self._stalled:
                    self.late_at.append(time.monotonic())
                self.worst_late_s = max(self.worst_late_s, now - due)
            self._stalled = late
            now = max(due, now)
            phase[:] = [call for call in phase if call.tick(due, now)]
        if any(self._phases):
            self._k = k + 1
            self._handle = self.loop.call_at(due + self._step_s, self._tick)
        else:
            self._handle = None


class LeanCallers:
    """The lean callers of one event loop: ``run_call`` is a ``twilio_flow.StreamRunner``. ``compiled``: the
    calls are ``CompiledCall``s (raises ``cython_build.BuildError`` if that cannot be built)."""

    def __init__(self, phases: int = PHASES, *, compiled: bool = False) -> None:
        self._phases = phases
        self._call = compiled_call_class() if compiled else LeanCall  # built (or refused) before any call
        self._beat: Beat | None = None
        self._frames: dict[int, tuple[npt.NDArray[np.int16] | None, list[bytes]]] = {}

    def frames(self, audio: npt.NDArray[np.int16] | None) -> list[bytes]:
        """``encode_frames(audio)``, once per audio array (a load passes every call the same one)."""
        cached = self._frames.get(id(audio))
        if cached is None or cached[0] is not audio:
            cached = self._frames[id(audio)] = (audio, encode_frames(audio))
        return cached[1]

    @property
    def stalls(self) -> Stalls:
        """When this process's beat stalled (ticked more than a frame late), and the most any tick ran late."""
        beat = self._beat
        return Stalls([], 0.0) if beat is None else Stalls(beat.late_at, beat.worst_late_s)

    async def run_call(self, config: CallConfig) -> CallResult:
        """Play one call's stream; raises ``OSError`` or ``TimeoutError`` when it cannot be opened, as
        ``caller.run_call`` does (``twilio_flow.run_flow`` reports them)."""
        if self._beat is None:
            self._beat = Beat(self._phases)
        beat = self._beat
        call = self._call(config, self.frames(config.audio_in), beat)
        try:
            transport, _ = await ws_connect(
                lambda: call,
                config.url,
                extra_headers=dict(config.headers) or None,
                websocket_handshake_timeout=config.open_timeout_s,
                logger_name=_picows_log,
                proxy=None,
                use_aiofastnet=False,
            )
        except WSError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        transport.send(_TEXT, CONNECTED)
        beat.add(call)
        try:
            await asyncio.shield(call.disconnected)
        except asyncio.CancelledError:  # the run's deadline: never leave the socket open
            transport.disconnect(graceful=False)
            raise
        finally:
            beat.discard(call)
        return call.result()


CONNECTED = Connected().to_json().encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true", help="run the full and the lean callers and compare")
    parser.add_argument("--calls", type=int, default=20, help="calls in each run (small: the lead measures at scale)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each call (at least 5)")
    parser.add_argument("--rounds", type=int, default=2, help="full then lean, this many times")
    parser.add_argument("--phases", type=int, default=PHASES, help="points of the 20 ms beat the lean calls send on")
    parser.add_argument("--server-cpus", metavar="CPUS", help="as capacity.py's: the server on these CPUs only")
    parser.add_argument("--server", choices=["bridge", "relay-picows"], default="bridge", help="the server under test")
    args = parser.parse_args(argv)
    if not args.compare:
        parser.error("nothing to do: --compare runs the comparison (capacity.py --callers lean uses these callers)")
    if args.seconds < 5 or min(args.calls, args.phases, args.rounds) < 1:
        parser.error("expected --seconds >= 5 (a steady window after the ramp) and --calls, --phases, --rounds >= 1")
    import lean_compare  # bench/, beside this script: only --compare needs capacity.py and its imports

    try:
        return lean_compare.compare_callers(
            args.server, args.calls, args.seconds, args.phases, args.rounds, args.server_cpus
        )
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
