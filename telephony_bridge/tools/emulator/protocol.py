"""The emulator's side of the Savants wire format: codes, message builders and frame checks, without I/O.

The spec documents only ``TOKEN_EXPIRED`` for the WebSocket and no close codes at all (spec §6.4, §11.4-5),
so the other codes below are ours. Each close code is 4000 + the HTTP status that means the same thing, so a
client that logs only the close code still says what went wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

SAMPLE_RATE_HZ = 16_000
SAMPLE_BYTES = 2  # signed 16-bit little-endian mono (spec §7)
FRAME_S = 0.020
FRAME_SAMPLES = 320  # 20 ms
FRAME_BYTES = 640  # 20 ms, the recommended frame (spec §6.3)
MAX_AUDIO_FRAME_BYTES = 8192  # "8 KB", read as the generous 8192 (spec §11.8)

CONNECTED_MESSAGE = "Voice API connection established successfully"


class WsErrorCode(StrEnum):
    """``error.code`` values the emulator sends on ``/voice-stream``; only TOKEN_EXPIRED is Savants'."""

    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    INVALID_TOKEN = "INVALID_TOKEN"
    TOKEN_REUSED = "TOKEN_REUSED"
    AUTH_TIMEOUT = "AUTH_TIMEOUT"
    CONCURRENCY_LIMIT = "CONCURRENCY_LIMIT"
    INVALID_AUDIO = "INVALID_AUDIO"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    SERVER_ERROR = "SERVER_ERROR"  # only from fault injection (the "error" fault's default code)


class CloseCode(IntEnum):
    """WebSocket close codes, one per error code (4000-4999 is the private-use range of RFC 6455)."""

    NORMAL = 1000
    INVALID_MESSAGE = 4400
    TOKEN_EXPIRED = 4401
    INVALID_TOKEN = 4403
    AUTH_TIMEOUT = 4408
    TOKEN_REUSED = 4409
    INVALID_AUDIO = 4415
    CONCURRENCY_LIMIT = 4429
    SERVER_ERROR = 4500


def close_code_for(code: WsErrorCode) -> CloseCode:
    return CloseCode[code.name]


def iso_timestamp(unix_s: float, *, millis: bool = True) -> str:
    """ISO 8601 in UTC with a ``Z``, as in the spec's examples (``2024-01-15T10:30:00.123Z``)."""
    moment = datetime.fromtimestamp(unix_s, tz=UTC)
    text = moment.isoformat(timespec="milliseconds" if millis else "seconds")
    return text.replace("+00:00", "Z")


def connected_message(connected_type: str, *, session_id: str, unix_s: float) -> str:
    """The confirmation with every field the reference schema shows (spec §6.4)."""
    return json.dumps(
        {
            "type": connected_type,
            "message": CONNECTED_MESSAGE,
            "timestamp": iso_timestamp(unix_s),
            "sessionId": session_id,
        }
    )


def ws_error_message(code: str, message: str, *, unix_s: float) -> str:
    """The reference-schema error shape (spec §6.4): ``{"type":"error","error":{code,message,timestamp}}``.

    ``code`` is a ``WsErrorCode`` or, from fault injection, any Savants code (e.g. ``DEVICE_INACTIVE``)."""
    error = {"code": str(code), "message": message, "timestamp": iso_timestamp(unix_s)}
    return json.dumps({"type": "error", "error": error})


def http_error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The token endpoint's envelope (spec §3.3): no top-level ``type``; ``details`` only when there are any."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def audio_frame_problem(frame: bytes) -> str | None:
    """Why a client audio frame breaks spec §6.3 (even, non-empty, at most 8 KB), or None if it is fine."""
    if not frame:
        return "expected a non-empty audio frame, got 0 bytes"
    if len(frame) % SAMPLE_BYTES:
        return f"expected an even number of bytes (16-bit samples), got {len(frame)}"
    if len(frame) > MAX_AUDIO_FRAME_BYTES:
        return f"expected at most {MAX_AUDIO_FRAME_BYTES} bytes per frame, got {len(frame)}"
    return None


def text_message_problem(text: str) -> str | None:
    """Why a post-auth text frame breaks spec §6.3 (JSON object with a string ``type``), or None."""
    try:
        message = json.loads(text)
    except ValueError:
        return "expected a JSON text message, got text that is not JSON"
    if not isinstance(message, dict):
        return f"expected a JSON object, got {type(message).__name__}"
    if not isinstance(message.get("type"), str):
        return "expected a string 'type' field in the JSON message"
    return None


@dataclass(frozen=True)
class Refusal:
    """Why the emulator ends a socket: the peer's fault, returned as a value rather than raised."""

    code: WsErrorCode
    message: str
