"""A Twilio media stream on a picows connection, shaped like the part of Starlette's ``WebSocket`` that
``TwilioLeg`` uses (``twilio.leg.TwilioSocket``).

picows calls ``on_ws_frame`` from the socket's read callback; a frame becomes one small ASGI-shaped message
in a deque, and the leg's pending ``receive()`` is woken through one future; or a text message goes straight
to the leg's tap (``tap_text``), which takes the caller's audio without a task switch per frame. picows reads
whenever data arrives (it never pauses reading); Twilio sends 50 small messages a second and the leg takes
them as they come, so the deque stays short, and a message is at most ``MAX_MESSAGE_BYTES``. Pings are
answered by picows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport

from telephony_bridge.close_codes import echo_code
from telephony_bridge.twilio.read_pairs import Pairing, ReadPairs
from telephony_bridge.ws_fragments import Assembled, Fault, Reassembler

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0  # for Twilio's answer to our close frame; then the TCP connection is dropped
# A caller whose socket takes nothing for this long has gone (Twilio reads continuously): the send fails and
# the connection is dropped, rather than the pacer waiting on it for the rest of the call.
SEND_STALL_S = 5.0
MAX_MESSAGE_BYTES = 2**20  # a message split over frames, whole: picows' own limit is per frame
MESSAGE_TOO_BIG = 1009
_TEXT = WSMsgType.TEXT
NO_STATUS = 1005  # a close frame without a code (RFC 6455 §7.1.5)
ABNORMAL_CLOSURE = 1006  # no close frame at all

Message = dict[str, Any]


class SocketClosed(ConnectionError):
    """A send on a stream that has closed (the leg turns this into ``CallerGone``)."""


class SendStalled(SocketClosed):
    """The peer took nothing for ``SEND_STALL_S``: the connection is dropped (the leg: ``CallerStalled``)."""


class StreamSocket(WSListener):  # type: ignore[misc]
    """One media-stream connection. ``on_open`` runs once the upgrade is answered (start the call there);
    ``read_pairs``: read its messages a pair at a time once they come steadily (``twilio/read_pairs.py``)."""

    def __init__(self, on_open: Callable[[StreamSocket], None], read_pairs: ReadPairs | None = None) -> None:
        self._on_open = on_open
        self._read_pairs = read_pairs
        self._pairing: Pairing | None = None
        self._transport: WSTransport | None = None
        self._inbox: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._fragments = Reassembler(MAX_MESSAGE_BYTES)
        self._writable: asyncio.Future[None] | None = None  # set while picows has paused writing
        self._disconnected = False
        self._tap: Callable[[bytes], bool] | None = None
        self.close_code: int | None = None  # the peer's, once it has sent a close frame
        self.fault: str | None = None  # why we closed the stream on the peer (it broke the protocol), if we did

    # --- picows callbacks ------------------------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        if self._read_pairs is not None:
            self._pairing = self._read_pairs.pairing(transport.underlying_transport.get_extra_info("socket"))
        self._on_open(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if transport.is_close_frame_sent and kind != WSMsgType.CLOSE:
            return  # we are closing: only the peer's answer matters now
        if kind == WSMsgType.TEXT and frame.fin:
            payload = frame.get_payload_as_bytes()
            pairing = self._pairing
            if pairing is not None:
                pairing.reads += 1
                if not pairing.armed:
                    pairing.heard(len(payload))
            tap = self._tap
            if tap is None or self._inbox or not tap(payload):
                self._deliver_text(payload)
        elif kind == WSMsgType.CLOSE:
            received = int(frame.get_close_code())
            self.close_code = received or NO_STATUS
            if not transport.is_close_frame_sent:
                transport.send_close(echo_code(received))  # the echo RFC 6455 §5.5.1 asks for
            transport.disconnect()
        elif kind in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            self._assemble(kind, frame)
        # PING is answered by picows; PONG is not asked for.

    def on_protocol_error(self, code: int, detail: str) -> None:
        """picows' parser refused a frame and is closing with ``code`` (``ws_handoff._WireLog``)."""
        self.fault = f"it broke the WebSocket protocol, closed with {code}: {detail}"

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._disconnected = True
        if self._pairing is not None:
            self._pairing.forget()
        self._deliver(self._disconnect_message())
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # --- what the leg calls ----------------------------------------------------------------------------------

    def tap_text(self, tap: Callable[[bytes], bool] | None) -> None:
        """Offer each whole text message to ``tap`` (its UTF-8 bytes) as it is read, while none waits unread in
        front of it; one the tap returns False for is queued for ``receive`` as usual."""
        self._tap = tap

    async def receive(self) -> Message:
        """The next message; ``websocket.disconnect`` once the connection is gone (then again on every call)."""
        while not self._inbox:
            if self._disconnected:
                return self._disconnect_message()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._inbox.popleft()

    def writable(self) -> bool:
        """Whether ``send_text_nowait`` (or ``send_utf8_now``) may send now: connected, not closing, no backpressure."""
        transport = self._transport
        return (
            transport is not None
            and not self._disconnected
            and not transport.is_close_frame_sent
            and (self._writable is None or self._writable.done())
        )

    def send_text_nowait(self, data: str | bytes) -> None:
        """``send_text`` when ``writable()`` (text as ``str``, or already UTF-8); raises ``SocketClosed`` otherwise."""
        if not self.writable():
            raise SocketClosed("the media stream is closed or not taking data")
        assert self._transport is not None
        self._transport.send(WSMsgType.TEXT, data if isinstance(data, bytes) else data.encode())

    def send_utf8_now(self, data: bytes) -> None:
        """``send_text_nowait`` for a caller that has just had ``writable()`` say yes (``TwilioLeg.send_audio_nowait``
        after ``can_send_now``; the AI's audio, 50 messages a second a call): the backpressure is not checked
        twice, but a closed stream still raises ``SocketClosed``, since no data frame may follow our close
        frame (RFC 6455 §5.5.1)."""
        transport = self._transport
        if transport is None or self._disconnected or transport.is_close_frame_sent:
            raise SocketClosed("the media stream is closed")
        transport.send(_TEXT, data)

    async def send_text(self, data: str) -> None:
        """Queue a text frame; waits while the kernel's send buffer is full, at most ``SEND_STALL_S``."""
        if self._writable is not None and not self._writable.done():
            try:
                # Shielded: a cancelled send must not resolve the shared future and so end the backpressure.
                async with asyncio.timeout(SEND_STALL_S):
                    await asyncio.shield(self._writable)
            except TimeoutError:
                if self._transport is not None and not self._disconnected:
                    log.warning("the caller took nothing we sent for %s s; dropping its connection", SEND_STALL_S)
                    self._transport.disconnect(graceful=False)
                raise SendStalled(f"the caller took nothing we sent for {SEND_STALL_S} s") from None
        self.send_text_nowait(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Send our close frame and wait (bounded) for Twilio's; safe to call more than once."""
        transport = self._transport
        if transport is None or self._disconnected:
            return
        self._let_go()  # the peer's close frame alone would not make a pair
        if not transport.is_close_frame_sent:
            transport.send_close(code, reason.encode() if reason else None)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await transport.wait_disconnected()
                return
        transport.disconnect(graceful=False)

    # --- internals -------------------------------------------------------------------------------------------

    def _close_soon(self, code: int) -> None:
        """Our close frame now, the TCP connection once the peer answers it (``on_ws_frame``) or after
        ``CLOSE_TIMEOUT_S``: dropping it at once would reset a peer that is still sending (unread data makes the
        kernel answer with RST), and the peer would never see why."""
        transport = self._transport
        if transport is None or transport.is_close_frame_sent:
            return
        self._let_go()
        transport.send_close(code)
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, transport.disconnect)

    def _let_go(self) -> None:
        if self._pairing is not None:
            self._pairing.let_go()

    def _disconnect_message(self) -> Message:
        """ASGI's ``websocket.disconnect``, with ``fault`` when we closed the stream for the peer's fault."""
        message: Message = {"type": "websocket.disconnect", "code": self.close_code or ABNORMAL_CLOSURE}
        if self.fault is not None:
            message["fault"] = self.fault
        return message

    def _deliver(self, message: Message) -> None:
        self._inbox.append(message)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _assemble(self, kind: WSMsgType, frame: WSFrame) -> None:
        """A message split over frames (Twilio does not split, but RFC 6455 lets any peer). Lenient, as the leg
        is with a malformed message: a new message replaces an unfinished one, a continuation of nothing is
        dropped; one over ``MAX_MESSAGE_BYTES`` closes the stream."""
        if kind != WSMsgType.CONTINUATION:
            self._fragments.reset()
        result = self._fragments.feed(kind.value, frame.get_payload_as_memoryview(), frame.fin)
        if isinstance(result, Assembled):
            if result.is_text:
                self._deliver_text(result.payload)
            else:
                self._deliver({"type": "websocket.receive", "bytes": result.payload})
        elif result is Fault.TOO_BIG:
            self.fault = f"it sent a message over {MAX_MESSAGE_BYTES} bytes, closed with {MESSAGE_TOO_BIG}"
            self._close_soon(MESSAGE_TOO_BIG)

    def _deliver_text(self, payload: bytes) -> None:
        """Text, or, if it is not UTF-8, the bytes: the leg counts and logs them as a malformed message."""
        try:
            self._deliver({"type": "websocket.receive", "text": payload.decode()})
        except UnicodeDecodeError:
            self._deliver({"type": "websocket.receive", "bytes": payload})
