"""A media-stream bridge that follows a script, for the simulated callers' tests (``tools/caller.py`` and
bench/lean_callers.py play the same calls against it)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from telephony_bridge.serving import running
from telephony_bridge.twilio.outbound_messages import clear_message, mark_message, media_message
from telephony_bridge.twilio.protocol import Connected, InboundEvent, Media, Start, parse_message


class ScriptedBridge:
    """Waits for ``start``, then echoes each media frame and a mark after it. Paths pick a variant:
    ``/echo``; ``/malformed`` (the first reply carries an extra ``track`` field, G3); ``/hangup`` (closes
    after five frames); ``/eager`` (sends a mark as soon as ``connected`` arrives, before ``start``);
    ``/clear`` (a ``clear`` after the fifth frame's echo and mark)."""

    def __init__(self) -> None:
        self.received: dict[str, list[InboundEvent]] = {}  # by call SID, every message the caller sent
        self.finished: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.app = Starlette(routes=[WebSocketRoute("/{variant}", self.endpoint)])
        self.ws_url = ""  # set once served

    def url(self, variant: str) -> str:
        return f"{self.ws_url}/{variant}"

    def finished_event(self, call_sid: str) -> threading.Event:
        with self._lock:
            return self.finished.setdefault(call_sid, threading.Event())

    async def endpoint(self, ws: WebSocket) -> None:
        variant = ws.path_params["variant"]
        await ws.accept()
        events: list[InboundEvent] = []
        stream_sid, call_sid = "", ""
        closing = False  # the caller's close came while we sent: read on, send nothing more

        async def send(text: str) -> None:
            nonlocal closing
            if not closing:
                try:
                    await ws.send_text(text)
                except WebSocketDisconnect:
                    closing = True  # what the caller sent before its close is still to be read

        try:
            async for text in ws.iter_text():
                event = parse_message(text)
                events.append(event)
                if isinstance(event, Connected) and variant == "eager":
                    await send(mark_message("MZ" + "0" * 32, "too-early"))
                elif isinstance(event, Start):
                    stream_sid, call_sid = event.stream_sid, event.call_sid
                elif isinstance(event, Media):
                    if variant == "malformed" and event.chunk == 1:
                        await send(media_message(stream_sid, event.payload)[:-2] + ',"track":"x"}}')
                    else:
                        await send(media_message(stream_sid, event.payload))
                    await send(mark_message(stream_sid, f"m{event.chunk}"))
                    if variant == "clear" and event.chunk == 5:
                        await send(clear_message(stream_sid))
                    if variant == "hangup" and event.chunk == 5:
                        await ws.close(1000)
                        break
        except WebSocketDisconnect:
            pass
        finally:
            with self._lock:
                self.received[call_sid] = events
            self.finished_event(call_sid).set()

    async def events_of(self, call_sid: str) -> list[InboundEvent]:
        """What the bridge received on that call, once its handler has finished."""
        assert await asyncio.to_thread(self.finished_event(call_sid).wait, 5.0)
        return self.received[call_sid]


@contextlib.contextmanager
def served() -> Iterator[ScriptedBridge]:
    """A scripted bridge on a free port of 127.0.0.1, stopped afterwards."""
    fake = ScriptedBridge()
    with running(fake.app) as server:
        fake.ws_url = server.ws_url
        yield fake


def noise(seconds: float) -> npt.NDArray[np.int16]:
    """What a caller says: noise at about -20 dBFS, so no frame of it is silent and its echo has one clear
    cross-correlation peak."""
    rng = np.random.default_rng(7)
    return np.clip(rng.normal(0, 3000, round(seconds * 8000)), -32768, 32767).astype(np.int16)
