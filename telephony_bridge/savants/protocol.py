"""The Savants /voice-stream session as a state machine, without I/O (spec: savants-voice-api.md §6).

Fed with what arrived, it says what happened; the driver does the sending. It keys only on ``type`` and
accepts both confirmation strings (§11.1), reads ``error.code``/``error.message`` and nothing else (§11.3),
and turns anything a peer can send into an event: garbage never raises into the driver.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

CONNECTED_TYPES = frozenset({"savant_voice_connected", "vapi_connected"})
MAX_FRAME_BYTES = 8192  # §6.3 "8 KB"; §11.8: accept up to 8192


class State(enum.Enum):
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    CONNECTED = "connected"
    CLOSED = "closed"


_CONNECTED = State.CONNECTED  # a global, not an attribute of the enum class: read per audio frame


@dataclass(frozen=True, slots=True)
class Confirmed:
    session_id: str | None


@dataclass(frozen=True, slots=True)
class Audio:
    pcm: bytes


@dataclass(frozen=True, slots=True)
class Notice:
    """A text message we do not act on (status messages are listed but have no schema, §6.4)."""

    type: str


@dataclass(frozen=True, slots=True)
class Failed:
    """Terminal: Savants sent an error, or broke the protocol (``code`` is then ours, ``PROTOCOL``)."""

    code: str
    message: str
    by_peer_error: bool


SessionEvent = Confirmed | Audio | Notice | Failed


class VoiceSession:
    """One /voice-stream connection's protocol state."""

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "state")

    def __init__(self) -> None:
        self.state = State.CONNECTING
        self.session_id: str | None = None

    def authenticate(self, token: str) -> str:
        """The first frame to send: the raw compact JWT, no JSON, no ``Bearer`` (§6.2)."""
        if self.state is not State.CONNECTING:
            raise RuntimeError(f"authenticate() called in state {self.state.value}")
        self.state = State.AUTHENTICATING
        return token

    def receive_text(self, text: str | bytes) -> SessionEvent:
        """A text message, decoded or as its UTF-8 bytes (orjson validates them: invalid UTF-8 is garbage too)."""
        if self.state is State.CLOSED:
            return Notice("after-close")
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            return self._fail("PROTOCOL", f"expected a JSON text message, got {text[:40]!r}", peer=False)
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return self._fail("PROTOCOL", "expected a JSON object with a string 'type'", peer=False)
        kind = msg["type"]
        if kind == "error":
            error = msg.get("error") if isinstance(msg.get("error"), dict) else {}
            code = error.get("code") if isinstance(error.get("code"), str) else "UNKNOWN"
            message = error.get("message") if isinstance(error.get("message"), str) else ""
            return self._fail(code, message, peer=True)
        if kind in CONNECTED_TYPES:
            if self.state is not State.AUTHENTICATING:
                return Notice(kind)  # a repeated confirmation is harmless
            self.state = State.CONNECTED
            sid = msg.get("sessionId")
            self.session_id = sid if isinstance(sid, str) else None
            return Confirmed(self.session_id)
        return Notice(kind)

    def is_audio(self, data: bytes) -> bool:
        """Whether ``receive_binary(data)`` is ``Audio(data)`` (and changes nothing): lets the driver hand the AI's
        audio on without building an event per frame (50 a second a call)."""
        return self.state is _CONNECTED and 0 < len(data) <= MAX_FRAME_BYTES

    def receive_binary(self, data: bytes) -> SessionEvent:
        if self.state is State.CLOSED:
            return Notice("after-close")
        if self.state is not State.CONNECTED:
            return self._fail("PROTOCOL", f"expected confirmation, got {len(data)} bytes of audio", peer=False)
        if not data or len(data) > MAX_FRAME_BYTES:
            return self._fail("PROTOCOL", f"audio frame of {len(data)} bytes (allowed 1-8192)", peer=False)
        return Audio(data)

    def closed(self) -> None:
        self.state = State.CLOSED

    def _fail(self, code: str, message: str, *, peer: bool) -> Failed:
        self.state = State.CLOSED
        return Failed(code, message, by_peer_error=peer)
