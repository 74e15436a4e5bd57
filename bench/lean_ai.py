"""A lean Savants voice-stream echo for bench/capacity.py (``--ai lean``): the emulator's ``echo`` voice as the
bridge sees it, at a fraction of the emulator's CPU, so the load's core can carry more calls than the bridge's.

Tokens stay with the real emulator (``POST /api/websocket-voice/token``, once a call); servers reach this
process's ``/voice-stream`` through ``SAVANTS_WS_URL``. Both processes take the tokens' HS256 key from
``EMULATOR_JWT_SECRET``, so this one verifies them as the emulator does (``tools/emulator/tokens.verify_token``).

What the bridge sees is the emulator's: the JWT as the first text frame within ``auth_timeout_s``, refused with
the same ``error`` message and close code (bad or expired token, reused token, more than ``max_concurrent``
sockets a device, binary first, no token in time); the same confirmation; then each client frame said back
``echo_delay_s`` after it arrived, re-cut into 640-byte frames on a real-time 20 ms grid, nothing sent while
there is nothing to say (``EchoLine`` is ``voices.EchoVoice``'s rules: tests hold them equal); audio frames
that are empty, odd or over 8 KB and text that is not a JSON object with a string ``type`` refused as the
emulator refuses them; a client's close answered with its code.

What it does not do, or check: the emulator's other voices, faults, ``confirm_delay_s``, ``close_after_s``,
``burst``, ``device_ids``/``inactive_device_ids`` (the bench uses neither), violation records and per-session
byte counts; a text message that is not valid UTF-8 is refused as one that is not JSON (uvicorn would close
1007). Every session's grid is one of ``SLOTS`` phases (1 ms apart) of one process-wide 20 ms grid, not its
own: what one timer costs instead of a task per session. Sending never waits for a slow reader. With
``--compiled`` (``capacity.py --ai compiled``) a confirmed session's audio in and frames out run in C
(bench/lean_ai_c.pyx, built with Cython on first use); everything else stays here.

    EMULATOR_JWT_SECRET=... python bench/lean_ai.py --port 9200          # the echo alone
    EMULATOR_JWT_SECRET=... python bench/lean_ai.py --port 9200 --compiled   # ...its per-frame work in C
    python bench/lean_ai.py --compare --calls 20 --seconds 8 [--rounds 3]  # emulator vs lean, same calls
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cython_build  # bench/, beside this script
import load_gc
import uvicorn
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from telephony_bridge.cli import EMULATOR_JWT_SECRET_ENV
from telephony_bridge.clock import Clock, SystemClock, Timer
from telephony_bridge.close_codes import echo_code
from telephony_bridge.serving import uvicorn_config
from telephony_bridge.tools.emulator.config import EmulatorConfig
from telephony_bridge.tools.emulator.limits import ConcurrencyLimit
from telephony_bridge.tools.emulator.protocol import (
    FRAME_BYTES,
    FRAME_S,
    MAX_AUDIO_FRAME_BYTES,
    Refusal,
    WsErrorCode,
    audio_frame_problem,
    close_code_for,
    connected_message,
    text_message_problem,
    ws_error_message,
)
from telephony_bridge.tools.emulator.session import VOICE_STREAM_PATH
from telephony_bridge.tools.emulator.tokens import JtiLedger, verify_token
from telephony_bridge.ws_fragments import Assembled, Reassembler
from telephony_bridge.ws_handoff import MAX_FRAME_BYTES, Connection

# Phases of the 20 ms grid, 1 ms apart: the emulator's sessions each keep their own grid, but uvloop's timers fire
# on whole milliseconds, so its frames go out in at most 20 groups too. Fewer phases cost less here (4: roughly 15 %
# less at 20 calls) but send each group's frames at once, which saves the bridge wake-ups that it would not save
# against the emulator or Savants.
SLOTS = 20
CLOSE_TIMEOUT_S = 2.0  # for the client's answer to our close frame; then the connection is dropped
PROTOCOL_ERROR = 1002  # broken fragmentation (RFC 6455 §7.4.1), as uvicorn closes for it
STATS_PATH = "/_lean/stats"
BENCH = Path(__file__).resolve().parent

log = logging.getLogger("lean_ai")

_TEXT, _BINARY, _CLOSE, _CONTINUATION = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE, WSMsgType.CONTINUATION


class EchoLine:
    """One session's echo, without I/O: ``voices.EchoVoice``'s rules (each frame heard is due ``delay_s`` after
    it arrived; 640-byte frames, a trailing part-frame padded once nothing more is queued) over the frames as
    received. A frame inside one received message is a view of it: nothing is copied or joined for it."""

    __slots__ = ("_chunks", "_offset", "delay_s")

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._chunks: deque[tuple[float, bytes]] = deque()  # (due at, audio), oldest first
        self._offset = 0  # into the oldest: what was said of it already

    def hear(self, pcm: bytes, at_s: float) -> None:
        self._chunks.append((at_s + self.delay_s, pcm))

    def speak(self, at_s: float) -> bytes | memoryview | None:
        """The frame for the tick at ``at_s`` (ticks never go back), or None to send nothing."""
        chunks = self._chunks
        if not chunks:
            return None
        due_s, head = chunks[0]
        if due_s > at_s:
            return None
        start = self._offset
        end = start + FRAME_BYTES
        if end < len(head):
            self._offset = end
            return memoryview(head)[start:end]
        if end == len(head):
            chunks.popleft()
            self._offset = 0
            return head if start == 0 else memoryview(head)[start:]
        return self._gather(at_s)

    def _gather(self, at_s: float) -> bytes | None:
        """A frame across received messages, or the padded last part-frame; None while a part-frame waits for
        audio that is heard but not yet due."""
        chunks = self._chunks
        due = -self._offset
        for due_s, data in chunks:
            if due_s > at_s:
                if due < FRAME_BYTES:
                    return None  # more is coming: wait for it rather than pad
                break
            due += len(data)
            if due >= FRAME_BYTES:
                break
        frame = bytearray()
        while len(frame) < FRAME_BYTES and chunks and chunks[0][0] <= at_s:
            data = chunks[0][1]
            piece = data[self._offset : self._offset + FRAME_BYTES - len(frame)]
            frame += piece
            self._offset += len(piece)
            if self._offset == len(data):
                chunks.popleft()
                self._offset = 0
        frame += bytes(FRAME_BYTES - len(frame))
        return bytes(frame)


class Speaker(Protocol):
    def on_tick(self, at_s: float) -> None:
        """Send what is due at the grid time ``at_s``."""
        ...


class Wheel:
    """Every session's 20 ms grid, without I/O: ``slots`` phases of one process-wide grid, a tick every
    ``FRAME_S / slots`` serving one phase's sessions. A session joins the phase of the next tick (its grid
    starts when it is confirmed, as the emulator's speaker's does); an empty wheel starts a fresh grid. A tick
    more than a frame late moves the grid rather than catch up in a burst (the emulator's ``MAX_LAG_S``).
    ``late`` counts the calls to ``tick`` more than a frame after the tick due: the echo's own lateness, which a
    bridge in front of it would count as the AI's frames coming late."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.late = 0
        self.step_s = FRAME_S / slots
        self._slots: list[dict[Speaker, None]] = [{} for _ in range(slots)]
        self._where: dict[Speaker, int] = {}
        self._origin_s = 0.0
        self._ticks = 0  # the next tick's number: it is at origin + ticks * step, for slot ticks % slots

    def __len__(self) -> int:
        return len(self._where)

    @property
    def next_s(self) -> float:
        return self._origin_s + self._ticks * self.step_s

    def add(self, speaker: Speaker, now_s: float) -> None:
        if not self._where:
            self._origin_s, self._ticks = now_s, 0
        slot = self._ticks % len(self._slots)
        self._slots[slot][speaker] = None
        self._where[speaker] = slot

    def discard(self, speaker: Speaker) -> None:
        slot = self._where.pop(speaker, None)
        if slot is not None:
            del self._slots[slot][speaker]

    def tick(self, now_s: float) -> float | None:
        """Serve every tick due by ``now_s``; the time of the next one, or None once no session is left."""
        if now_s - self.next_s > FRAME_S:
            self.late += 1
            self._origin_s = now_s - self._ticks * self.step_s
        while self._where and self.next_s <= now_s:
            at_s = self.next_s
            for speaker in tuple(self._slots[self._ticks % len(self._slots)]):  # one may leave as it sends
                speaker.on_tick(at_s)
            self._ticks += 1
        return self.next_s if self._where else None


class LeanAi:
    """What the sessions share: the emulator's settings, the wheel and its one timer, the token ledger, the
    per-device socket limit and counts for ``/_lean/stats``. It is the ``ws_handoff`` router of the app."""

    def __init__(
        self, config: EmulatorConfig, clock: Clock | None = None, phases: int = SLOTS, *, compiled: bool = False
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.wheel = Wheel(phases)
        self.used_tokens = JtiLedger()
        self.sockets = ConcurrencyLimit(config.max_concurrent)
        self.sessions_opened = 0
        self.refused: dict[str, int] = {}
        self._timer: Timer | None = None
        # Only on the system clock, which the compiled half reads; built (or refused) before any session.
        if compiled and not isinstance(self.clock, SystemClock):
            raise ValueError("the compiled echo reads the system's monotonic clock: it takes no other clock")
        self._session = compiled_session_class() if compiled else EchoSession

    def __call__(self, request: WSUpgradeRequest, connection: Connection) -> EchoSession | None:
        path = request.path.split(b"?", 1)[0]
        return self._session(self) if path == VOICE_STREAM_PATH.encode() else None

    def join(self, session: EchoSession) -> None:
        self.sessions_opened += 1
        self.wheel.add(session, self.clock.monotonic())
        if self._timer is None:
            self._timer = self.clock.call_at(self.wheel.next_s, self._tick)

    def _tick(self) -> None:
        next_s = self.wheel.tick(self.clock.monotonic())
        self._timer = None if next_s is None else self.clock.call_at(next_s, self._tick)

    def stats(self) -> dict[str, object]:
        return {
            "sessions_opened": self.sessions_opened,
            "sessions_active": len(self.wheel),
            "refused": self.refused,
            "ticks_late_over_a_frame": self.wheel.late,
            "gc_pauses_over_a_frame": load_gc.PAUSES.over_a_frame,
        }


class EchoSession(WSListener):  # type: ignore[misc]
    """One ``/voice-stream`` socket on picows' callbacks: its token, then its audio into an ``EchoLine`` and the
    wheel's ticks out of it. No task, and one timer only until the token has come."""

    _line_type: Callable[[float], EchoLine] = EchoLine

    def __init__(self, ai: LeanAi) -> None:
        self._ai = ai
        self._transport: WSTransport | None = None
        self._line: EchoLine | None = None  # once confirmed
        self._device_id: str | None = None  # holds one of its device's sockets
        self._deadline: Timer | None = None
        self._fragments: Reassembler | None = None  # only for a message split over frames
        self._ended = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        ai = self._ai
        timeout_s = ai.config.auth_timeout_s
        refusal = Refusal(WsErrorCode.AUTH_TIMEOUT, f"expected a token within {timeout_s:g} s of connecting")
        self._deadline = ai.clock.call_at(ai.clock.monotonic() + timeout_s, lambda: self._refuse(refusal))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        line = self._line
        size = frame.payload_size
        if (
            line is not None
            and frame.msg_type is _BINARY
            and frame.fin
            and 0 < size <= MAX_AUDIO_FRAME_BYTES
            and not size & 1
        ):
            line.hear(frame.get_payload_as_bytes(), self._ai.clock.monotonic())  # 25 to 50 times a second
        else:
            self._other_frame(transport, frame)

    def _other_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Every frame but a confirmed session's whole audio frame of a size the emulator takes (``on_ws_frame``,
        or ``lean_ai_c.EchoCore``'s in C)."""
        kind = frame.msg_type
        if kind is _BINARY and self._line is not None and frame.fin:
            problem = audio_frame_problem(frame.get_payload_as_bytes()) or ""
            self._refuse(Refusal(WsErrorCode.INVALID_AUDIO, problem))
        elif kind is _CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(echo_code(int(frame.get_close_code())))
            transport.disconnect()
        elif self._ended:
            return  # refused: only the client's answer to our close counts now
        elif kind is _TEXT or kind is _BINARY or kind is _CONTINUATION:
            if frame.fin and kind is not _CONTINUATION:
                self._message(kind is _TEXT, frame.get_payload_as_bytes())
                return
            if self._fragments is None:
                self._fragments = Reassembler(MAX_FRAME_BYTES)
            assembled = self._fragments.feed(kind.value, frame.get_payload_as_memoryview(), frame.fin)
            if isinstance(assembled, Assembled):
                self._message(assembled.is_text, assembled.payload)
            elif assembled is not None:
                self._close(PROTOCOL_ERROR)
        # PING is answered by picows (ws_handoff); PONG is not asked for.

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._end()

    def on_tick(self, at_s: float) -> None:
        line, transport = self._line, self._transport
        if line is not None and transport is not None:
            frame = line.speak(at_s)
            if frame is not None:
                transport.send(_BINARY, frame)

    def _message(self, is_text: bool, payload: bytes) -> None:
        """A whole message off the fast path: the token, a text frame, or audio that came split over frames."""
        line = self._line
        if line is None:
            if is_text:
                self._authenticate(payload.decode(errors="replace"))
            else:
                binary_first = "expected the token as a text frame, got a binary frame"
                self._refuse(Refusal(WsErrorCode.INVALID_TOKEN, binary_first))
        elif is_text:
            try:
                problem = text_message_problem(payload.decode())
            except UnicodeDecodeError:
                problem = "expected a JSON text message, got text that is not JSON"
            if problem is not None:
                self._refuse(Refusal(WsErrorCode.INVALID_MESSAGE, problem))
        elif (problem := audio_frame_problem(payload)) is not None:
            self._refuse(Refusal(WsErrorCode.INVALID_AUDIO, problem))
        else:
            line.hear(payload, self._ai.clock.monotonic())

    def _authenticate(self, token: str) -> None:
        """The emulator's checks in its order (``session.VoiceStreamEndpoint``), then the confirmation."""
        ai = self._ai
        self._cancel_deadline()
        now_s = ai.clock.wall()
        verdict = verify_token(token, ai.config.jwt_secret, now_s=now_s)
        if isinstance(verdict, Refusal):
            self._refuse(verdict)
            return
        if not ai.used_tokens.first_use(verdict, now_s=now_s):
            self._refuse(Refusal(WsErrorCode.TOKEN_REUSED, "expected a new token; each token opens one connection"))
            return
        if not ai.sockets.acquire(verdict.device_id):
            limit = ai.config.max_concurrent
            refusal = Refusal(WsErrorCode.CONCURRENCY_LIMIT, f"expected at most {limit} open sockets for this device")
            self._refuse(refusal)
            return
        self._device_id = verdict.device_id
        assert self._transport is not None  # a frame came on it
        session_id = f"sess_{secrets.token_hex(6)}"
        self._transport.send(_TEXT, connected_message(ai.config.connected_type, session_id=session_id, unix_s=now_s))
        self._line = self._line_type(ai.config.echo_delay_s)
        ai.join(self)

    def _refuse(self, refusal: Refusal) -> None:
        """The emulator's refusal: the error message, then a close with the matching code (the reason is the
        error code)."""
        if self._ended or self._transport is None:
            return
        ai = self._ai
        ai.refused[refusal.code.value] = ai.refused.get(refusal.code.value, 0) + 1
        log.debug("session refused: %s: %s", refusal.code.value, refusal.message)
        self._transport.send(_TEXT, ws_error_message(refusal.code, refusal.message, unix_s=ai.clock.wall()))
        self._close(close_code_for(refusal.code), refusal.code.value)

    def _close(self, code: int, reason: str = "") -> None:
        """Our close frame, and the session over; the connection goes when the client answers it or after
        ``CLOSE_TIMEOUT_S``."""
        transport = self._transport
        self._end()
        if transport is None or transport.is_disconnected or transport.is_close_frame_sent:
            return
        transport.send_close(code, reason.encode())
        self._ai.clock.call_at(self._ai.clock.monotonic() + CLOSE_TIMEOUT_S, transport.disconnect)

    def _end(self) -> None:
        """Out of the wheel, its device's socket given back, its deadline off: once, however it ended."""
        if self._ended:
            return
        self._ended = True
        self._cancel_deadline()
        self._ai.wheel.discard(self)
        self._line = None
        if self._device_id is not None:
            self._ai.sockets.release(self._device_id)
            self._device_id = None

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def compiled_session_class() -> type[EchoSession]:
    """``CompiledEchoSession``: ``EchoSession`` with its hot half from bench/lean_ai_c.pyx (built on first use:
    bench/cython_build.py), once a process. Raises ``cython_build.BuildError`` if it cannot be built."""
    global _compiled_session
    if _compiled_session is None:
        core = cython_build.load(BENCH / "lean_ai_c.pyx")

        class CompiledEchoSession(core.EchoCore, EchoSession):  # type: ignore[misc,name-defined]
            """``EchoSession`` with a confirmed session's audio in and its frames out in C (``EchoCore``) and the
            C ``EchoLine``: the same frames, refusals and counts."""

            _line_type = core.EchoLine

        _compiled_session = CompiledEchoSession
    return _compiled_session


_compiled_session: type[EchoSession] | None = None


def create_lean_app(
    config: EmulatorConfig, clock: Clock | None = None, phases: int = SLOTS, *, compiled: bool = False
) -> Starlette:
    """The echo under uvicorn with its WebSockets on picows (``ws_handoff``), as the bench's other servers:
    ``/healthz`` for capacity.py's start-up wait, ``/_lean/stats``; its ``LeanAi`` is ``app.state.lean``.
    ``compiled``: its sessions are ``CompiledEchoSession``s."""
    ai = LeanAi(config, clock, phases, compiled=compiled)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def stats(request: Request) -> Response:
        return JSONResponse(ai.stats())

    app = Starlette(routes=[Route("/healthz", healthz), Route(STATS_PATH, stats)])
    app.state.websocket_router = ai
    app.state.lean = ai
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = EmulatorConfig()
    parser.add_argument("--port", type=int, default=9200, help="the echo's port (on 127.0.0.1)")
    parser.add_argument("--echo-delay", type=float, default=defaults.echo_delay_s, help="as the emulator's")
    parser.add_argument("--phases", type=int, default=SLOTS, help="phases of the 20 ms grid (see SLOTS)")
    parser.add_argument("--compiled", action="store_true", help="each session's per-frame work in C (lean_ai_c.pyx)")
    parser.add_argument("--compare", action="store_true", help="run the same calls against the emulator and this")
    parser.add_argument("--calls", type=int, default=20, help="--compare: calls at once (small: the lead measures)")
    parser.add_argument("--seconds", type=float, default=8.0, help="--compare: length of each call")
    parser.add_argument("--load-procs", type=int, default=2, help="--compare: processes the callers run in")
    parser.add_argument("--rounds", type=int, default=1, help="--compare: alternating runs of each")
    args = parser.parse_args(argv)
    if args.compare:
        import lean_compare  # bench/, beside this script: only --compare needs capacity.py and its imports

        return lean_compare.compare_ai(args.calls, args.seconds, args.load_procs, args.rounds)
    secret = os.environ.get(EMULATOR_JWT_SECRET_ENV)
    if not secret:
        parser.error(f"{EMULATOR_JWT_SECRET_ENV} must hold the emulator's token key (the same for both processes)")
    config = EmulatorConfig(api_key="unused", jwt_secret=secret, echo_delay_s=args.echo_delay)
    logging.basicConfig(level=logging.WARNING)
    try:
        app = create_lean_app(config, phases=args.phases, compiled=args.compiled)
    except cython_build.BuildError as exc:
        parser.error(f"--compiled: {exc}")
    # The bridge's own GC settings: one full collection here stalls every session's echo at once, and the bridge
    # in front would count each as the AI's frames coming late (a hole in every call that is not the bridge's).
    load_gc.prepare()
    uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=args.port)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
