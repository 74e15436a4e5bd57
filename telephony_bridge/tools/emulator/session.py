"""``WS /voice-stream``: one socket's life, from the in-band token to the last audio frame (spec §6).

The socket is accepted, then must send its JWT as the first text frame within ``auth_timeout_s``. After the
confirmation, a listener task feeds client audio to the voice while a speaker task sends the voice's frames
on a 20 ms grid of the injected clock. Both live in one TaskGroup, so closing the socket cancels both.
Every refusal is an ``error`` message followed by a close with the code from ``protocol.CloseCode``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from telephony_bridge.tools.emulator.faults import SessionFault
from telephony_bridge.tools.emulator.protocol import (
    FRAME_S,
    Refusal,
    WsErrorCode,
    audio_frame_problem,
    close_code_for,
    connected_message,
    text_message_problem,
    ws_error_message,
)
from telephony_bridge.tools.emulator.state import EmulatorState, SessionStats
from telephony_bridge.tools.emulator.tokens import TokenClaims, verify_token
from telephony_bridge.tools.emulator.transport import reset, transport_of
from telephony_bridge.tools.emulator.voices import Voice, voice_for

logger = logging.getLogger(__name__)

VOICE_STREAM_PATH = "/voice-stream"
# A speaker more than a frame late (a stalled event loop) moves its grid rather than catch up in a burst.
MAX_LAG_S = FRAME_S


@dataclass
class _Ending:
    """How a streaming session ended: the socket closed (with this code) or we refused the client."""

    client_close_code: int | None = None
    refusal: Refusal | None = None

    def describe(self) -> str:
        if self.refusal is not None:
            return self.refusal.code.value
        return f"disconnect ({self.client_close_code})"


class VoiceStreamEndpoint:
    """The voice-stream route, bound to one emulator's state and its recording (for the ``file`` voice)."""

    def __init__(self, state: EmulatorState, wav_pcm: bytes = b"") -> None:
        self.state = state
        self.config = state.config
        self.clock = state.clock
        self.wav_pcm = wav_pcm

    async def handle(self, websocket: WebSocket) -> None:
        await websocket.accept()
        claims_or_refusal = await self._authenticate(websocket)
        if claims_or_refusal is None:
            return  # the client left before sending a token
        if isinstance(claims_or_refusal, Refusal):
            await self._refuse(websocket, claims_or_refusal, device_id=None)
            return
        device_id = claims_or_refusal.device_id
        if not self.state.sockets.acquire(device_id):
            self.state.record_violation("concurrency", device_id)
            limit = self.config.max_concurrent
            refusal = Refusal(WsErrorCode.CONCURRENCY_LIMIT, f"expected at most {limit} open sockets for this device")
            await self._refuse(websocket, refusal, device_id=device_id)
            return
        try:
            await self._serve(websocket, device_id)
        finally:
            self.state.sockets.release(device_id)

    async def _authenticate(self, websocket: WebSocket) -> TokenClaims | Refusal | None:
        """The first frame's verdict; None if the client disconnected first."""
        message = await self._receive_before(websocket, self.clock.monotonic() + self.config.auth_timeout_s)
        if message is None:
            timeout = self.config.auth_timeout_s
            return Refusal(WsErrorCode.AUTH_TIMEOUT, f"expected a token within {timeout:g} s of connecting")
        if message["type"] == "websocket.disconnect":
            return None
        token = message.get("text")
        if token is None:
            return Refusal(WsErrorCode.INVALID_TOKEN, "expected the token as a text frame, got a binary frame")
        now_s = self.clock.wall()
        verdict = verify_token(token, self.config.jwt_secret, now_s=now_s)
        if isinstance(verdict, Refusal):
            return verdict
        if verdict.device_id in self.config.inactive_device_ids or (
            self.config.device_ids is not None and verdict.device_id not in self.config.device_ids
        ):
            return Refusal(WsErrorCode.INVALID_TOKEN, "expected a token for an active device")
        if not self.state.used_tokens.first_use(verdict, now_s=now_s):
            return Refusal(WsErrorCode.TOKEN_REUSED, "expected a new token; each token opens one connection")
        return verdict

    async def _receive_before(self, websocket: WebSocket, deadline_s: float) -> Message | None:
        """The next ASGI message, or None if the injected clock reaches ``deadline_s`` first."""
        async with asyncio.TaskGroup() as tasks:
            receiving = tasks.create_task(websocket.receive())
            timer = tasks.create_task(self.clock.sleep_until(deadline_s))
            await asyncio.wait((receiving, timer), return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
            timer.cancel()
        return None if receiving.cancelled() else receiving.result()

    async def _serve(self, websocket: WebSocket, device_id: str) -> None:
        session = self.state.open_session(f"sess_{secrets.token_hex(6)}", device_id)
        fault = self.state.faults.session_fault(device_id)
        opened_s = self.clock.monotonic()
        ending = _Ending()
        try:
            if self.config.confirm_delay_s:
                await self.clock.sleep_until(self.clock.monotonic() + self.config.confirm_delay_s)
            voice = voice_for(self.config, self.wav_pcm)
            if fault is not None and fault.kind == "no_confirm":
                session.fault = fault.label
                logger.info("injecting fault %s on %s", fault.label, session.session_id)
                ending = await self._listen(websocket, session, voice)  # hears the client, never answers
            else:
                confirmation = connected_message(
                    self.config.connected_type, session_id=session.session_id, unix_s=self.clock.wall()
                )
                await websocket.send_text(confirmation)
                ending = await self._stream(websocket, session, voice, fault)
            if ending.refusal is not None:
                await self._refuse(websocket, ending.refusal, device_id=device_id, log=False)
        except WebSocketDisconnect as exc:
            ending = _Ending(client_close_code=exc.code)
        finally:
            self.state.close_session(session)
            logger.info(
                "session closed: %s device %s after %.1f s, in %d bytes (%d frames), "
                "out %d bytes (%d frames), ended by %s%s",
                session.session_id,
                device_id,
                self.clock.monotonic() - opened_s,
                session.bytes_in,
                session.frames_in,
                session.bytes_out,
                session.frames_out,
                ending.describe(),
                f" (fault {session.fault})" if session.fault else "",
            )

    async def _stream(
        self, websocket: WebSocket, session: SessionStats, voice: Voice, fault: SessionFault | None
    ) -> _Ending:
        async with asyncio.TaskGroup() as tasks:
            speaker = tasks.create_task(self._speak(websocket, session, voice))
            listener = tasks.create_task(self._listen(websocket, session, voice))
            injector = None
            if fault is not None:
                injector = tasks.create_task(self._inject_fault(websocket, session, fault, (speaker, listener)))
            hangup = None
            if self.config.close_after_s is not None:
                hangup = tasks.create_task(self._hang_up(websocket, self.config.close_after_s))
            await asyncio.wait([listener])
            if listener.cancelled() and injector is not None:
                await asyncio.wait([injector])  # a stall: the injector ends it with a reset
            for task in (speaker, injector, hangup):
                if task is not None:
                    task.cancel()
        return _Ending(client_close_code=1006) if listener.cancelled() else listener.result()

    async def _hang_up(self, websocket: WebSocket, after_s: float) -> None:
        """End the session normally, as an AI does when the conversation is over."""
        await self.clock.sleep_until(self.clock.monotonic() + after_s)
        try:
            await websocket.close(1000)
        except (WebSocketDisconnect, RuntimeError):
            return

    async def _inject_fault(
        self,
        websocket: WebSocket,
        session: SessionStats,
        fault: SessionFault,
        workers: tuple[asyncio.Task[None], asyncio.Task[_Ending]],
    ) -> None:
        """``fault`` (faults.SessionFault), ``after_s`` into the session."""
        await self.clock.sleep_until(self.clock.monotonic() + fault.after_s)
        session.fault = fault.label
        logger.info("injecting fault %s on %s", fault.label, session.session_id)
        transport = transport_of(websocket.scope)
        try:
            if fault.kind == "garbage":
                await websocket.send_text("this is not JSON")
            elif fault.kind == "error":
                self.state.record_error(fault.error_code)
                message = ws_error_message(fault.error_code, "injected fault", unix_s=self.clock.wall())
                await websocket.send_text(message)
                await websocket.close(fault.effective_close_code, fault.error_code)
            elif fault.kind in ("reset", "stall") and transport is None:
                logger.warning("fault %s needs uvicorn's transport; closing with 1011 instead", fault.kind)
                await websocket.close(1011)
            elif fault.kind == "reset" and transport is not None:
                reset(transport)
            elif fault.kind == "stall" and transport is not None:
                for worker in workers:  # nothing read (so no pong) and nothing sent from now on
                    worker.cancel()
                transport.pause_reading()
                await self.clock.sleep_until(self.clock.monotonic() + fault.stall_s)
                reset(transport)
            else:
                await websocket.close(fault.effective_close_code)
        except (WebSocketDisconnect, RuntimeError):
            return  # the client left first

    async def _listen(self, websocket: WebSocket, session: SessionStats, voice: Voice) -> _Ending:
        """Client frames until the client leaves or breaks spec §6.3."""
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return _Ending(client_close_code=message.get("code"))
            frame = message.get("bytes")
            if frame is not None:
                problem = audio_frame_problem(frame)
                if problem is not None:
                    return _Ending(refusal=Refusal(WsErrorCode.INVALID_AUDIO, problem))
                session.bytes_in += len(frame)
                session.frames_in += 1
                voice.hear(frame, self.clock.monotonic())
                continue
            problem = text_message_problem(message.get("text") or "")
            if problem is not None:
                return _Ending(refusal=Refusal(WsErrorCode.INVALID_MESSAGE, problem))
            logger.debug("ignoring a client JSON message on %s", session.session_id)

    async def _speak(self, websocket: WebSocket, session: SessionStats, voice: Voice) -> None:
        """One frame (or none) per 20 ms tick of the injected clock, until cancelled or the client leaves."""
        tick_s = self.clock.monotonic()
        try:
            while True:
                await self.clock.sleep_until(tick_s)
                lag_s = self.clock.monotonic() - tick_s
                if lag_s > MAX_LAG_S:
                    self.state.ticks_late_over_a_frame += 1
                    tick_s += lag_s
                frame = voice.speak(tick_s)
                while frame is not None:
                    await websocket.send_bytes(frame)
                    session.bytes_out += len(frame)
                    session.frames_out += 1
                    frame = voice.speak(tick_s) if self.config.burst else None
                tick_s += FRAME_S
        except WebSocketDisconnect:
            return  # the listener sees the disconnect too and ends the session

    async def _refuse(self, websocket: WebSocket, refusal: Refusal, *, device_id: str | None, log: bool = True) -> None:
        """Send the error message, then close with the matching code (the reason is the error code)."""
        self.state.record_error(refusal.code.value)
        if log:
            logger.info("session refused: %s for device %s: %s", refusal.code.value, device_id, refusal.message)
        try:
            await websocket.send_text(ws_error_message(refusal.code, refusal.message, unix_s=self.clock.wall()))
            await websocket.close(close_code_for(refusal.code), refusal.code.value)
        except WebSocketDisconnect:
            pass  # the client is already gone; nothing left to tell it
