"""Twilio's HTTP side: ``/voice``, ``/stream-status``, ``/stream-ended``, and the upgrade check.

Every request is checked against ``X-Twilio-Signature`` before any work (no lease, no token request); a bad
one gets 403 and one WARNING line with the path and remote address. Before even that, a request that cannot be
Twilio's (a POST that is empty or not form-encoded, a ``/voice`` without ``CallSid``) gets 400 with the reason;
such lines are throttled (one per reason a minute), since anyone can send them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import FormData
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response

from telephony_bridge.admission import Admission
from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.drain import DRAINED, Drain
from telephony_bridge.errors import AdmissionError, SavantsError
from telephony_bridge.ops import logging as oplog
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.settings import Settings
from telephony_bridge.store import StoreUnavailable
from telephony_bridge.twilio import twiml
from telephony_bridge.twilio.signatures import SignatureChecker

log = logging.getLogger(__name__)

MEDIA_STREAM_PATH = "/media-stream"
STREAM_STATUS_PATH = "/stream-status"
STREAM_ENDED_PATH = "/stream-ended"
TWIML_MEDIA_TYPE = "application/xml"
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"  # what Twilio POSTs (§5.1)
REJECTED_LOG_EVERY_S = 60.0
# Outcomes after which the caller hears the apology; "completed" (the AI ended the call) just hangs up.
APOLOGISE_AFTER = frozenset({"ai_unavailable", "error"})


class TwilioWebhooks:
    def __init__(
        self,
        settings: Settings,
        admission: Admission,
        metrics: Metrics,
        checker: SignatureChecker | None,
        drain: Drain,
        clock: Clock | None = None,
    ) -> None:
        self._settings = settings
        self._drain = drain
        self._admission = admission
        self._metrics = metrics
        self._checker = checker
        self._clock = clock or SystemClock()
        self._rejections = oplog.Throttled(log, REJECTED_LOG_EVERY_S)
        tw = settings.twilio
        self._voice = twiml.Voice(tw.say_voice, tw.say_language)

    # --- signatures --------------------------------------------------------------------------------------

    async def _params(self, request: Request) -> FormData | Mapping[str, str] | Response:
        """The request's Twilio parameters, or a 400 saying why this request cannot be one of Twilio's."""
        if request.method != "POST":
            return request.query_params
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if not await request.body():
            return self._reject(request, "empty_body", "expected Twilio's form-encoded parameters, got an empty body")
        if media_type != FORM_MEDIA_TYPE:
            return self._reject(
                request, "content_type", f"expected Content-Type {FORM_MEDIA_TYPE}, got {media_type!r:.60}"
            )
        return await request.form()

    def _reject(self, request: Request, reason: str, why: str) -> Response:
        self._metrics.webhooks_rejected.labels(reason=reason).inc()
        remote = request.client.host if request.client else "unknown"
        self._rejections.warning(
            reason,
            self._clock.monotonic(),
            "refused %s from %s, not a Twilio webhook: %s",
            request.url.path,
            remote,
            why,
        )
        return PlainTextResponse(why, status_code=400)

    def _signed(self, request: Request, params: Mapping[str, Any]) -> bool:
        if self._checker is None:
            return True
        # A GET carries its parameters in the signed URL already; a POST appends its form (§5.1).
        body_params = params if request.method == "POST" else {}
        raw_query = request.scope.get("query_string", b"").decode("latin-1")
        signature = request.headers.get("x-twilio-signature")
        if self._checker.check_http(request.url.path, raw_query, body_params, signature):
            return True
        self._refused(request, "missing" if not signature else "wrong")
        return False

    def upgrade_signed(self, conn: HTTPConnection) -> bool:
        """The media-stream upgrade, signed over the wss:// URL (§5.2); checked before ``accept``."""
        remote = conn.client.host if conn.client else None
        return self.stream_signed(conn.url.path, conn.headers.get("x-twilio-signature"), remote)

    def stream_signed(self, path: str, signature: str | None, remote: str | None) -> bool:
        """``upgrade_signed`` for a server that is not Starlette's (``twilio.media_route``)."""
        if self._checker is None:
            return True
        if self._checker.check_upgrade(path, signature):
            return True
        self._log_refusal(path, remote, "missing" if not signature else "wrong")
        return False

    def _refused(self, conn: HTTPConnection, why: str) -> None:
        self._log_refusal(conn.url.path, conn.client.host if conn.client else None, why)

    def _log_refusal(self, path: str, remote: str | None, why: str) -> None:
        self._metrics.signature_failures.labels(path=path).inc()
        log.warning("refused %s from %s: %s X-Twilio-Signature", path, remote or "unknown", why)

    # --- /voice ------------------------------------------------------------------------------------------

    async def voice(self, request: Request) -> Response:
        params = await self._params(request)
        if isinstance(params, Response):
            return params
        if not self._signed(request, params):
            return PlainTextResponse("invalid signature", status_code=403)
        call_sid = str(params.get("CallSid", ""))
        if not call_sid:
            return self._reject(request, "no_call_sid", "expected a CallSid parameter, got none")
        caller = str(params.get("From", "")) or None
        with oplog.call_context(call_sid=call_sid):
            return await self._answer(request, call_sid, caller, params)

    async def _answer(self, request: Request, call_sid: str, caller: str | None, params: Mapping[str, Any]) -> Response:
        tw = self._settings.twilio
        if self._drain.draining:  # this replica is shutting down: the caller is told to call again
            return self._refuse_draining()
        try:
            if not await self._admission.within_connect_limit(call_sid, tw.max_connects_per_call, tw.connect_window_s):
                return self._refuse_replay()
            admitted = await self._admission.admit(call_sid, caller)
        except AdmissionError as exc:
            self._metrics.admission_refused.labels(where="webhook").inc()
            log.warning("call refused, busy: %s", exc)
            return self._busy()
        except (SavantsError, StoreUnavailable) as exc:
            log.error("call not connected, the AI is unavailable: %s", exc)
            return self._document("unavailable", twiml.message_document(tw.unavailable_message, self._voice))
        if self._drain.draining:  # began while this call was admitted: its drain did not wait for its stream
            await self._admission.forget(call_sid)
            return self._refuse_draining()
        log.info("call admitted", extra={"device_id": admitted.lease.device_id, "warm_token": admitted.warm})
        parameters = {"token": admitted.stream_token}
        parameters.update({k.lower(): str(params[k]) for k in ("From", "To") if params.get(k)})
        base = self._public_base(request)
        document = twiml.connect_document(
            _ws_scheme(base) + MEDIA_STREAM_PATH,
            parameters,
            status_callback=base + STREAM_STATUS_PATH,
            action=base + STREAM_ENDED_PATH,
        )
        return self._document("connect", document)

    def _refuse_replay(self) -> Response:
        """The call has had ``twilio.max_connects_per_call`` answers: more is a replayed request (Twilio signs no
        timestamp), each of which would spend a token of the pool's budget and hold a slot. Hang up."""
        self._metrics.admission_refused.labels(where="replay").inc()
        log.warning(
            "call refused: it has had twilio.max_connects_per_call (%d) /voice answers, so this is a replay",
            self._settings.twilio.max_connects_per_call,
        )
        return self._document("replay", twiml.hangup_document())

    def _refuse_draining(self) -> Response:
        self._metrics.admission_refused.labels(where="draining").inc()
        log.warning("call refused: this replica is draining")
        return self._busy()

    def _busy(self) -> Response:
        tw = self._settings.twilio
        reject = tw.busy_response == "reject"
        return self._document("busy", twiml.busy_document(tw.busy_message, self._voice, reject=reject))

    def _document(self, kind: str, xml: str) -> Response:
        self._metrics.webhook_answers.labels(document=kind).inc()
        return Response(xml, media_type=TWIML_MEDIA_TYPE)

    def _public_base(self, request: Request) -> str:
        """PUBLIC_URL when set; in dev, what the request says (signatures are off there anyway)."""
        if self._settings.server.public_url:
            return self._settings.server.public_url
        return f"{request.url.scheme}://{request.url.netloc}"

    # --- /stream-status and /stream-ended -----------------------------------------------------------------

    async def stream_status(self, request: Request) -> Response:
        params = await self._params(request)
        if isinstance(params, Response):
            return params
        if not self._signed(request, params):
            return PlainTextResponse("invalid signature", status_code=403)
        event = str(params.get("StreamEvent", "unknown"))
        if event not in {"stream-started", "stream-stopped", "stream-error"}:
            event = "unknown"
        self._metrics.stream_status.labels(event=event).inc()
        with oplog.call_context(call_sid=str(params.get("CallSid", "")), stream_sid=str(params.get("StreamSid", ""))):
            if event == "stream-error":
                log.warning("twilio reports a stream error: %s", params.get("StreamError", "(no description)"))
                await self._forget(params)  # this stream will not reach us: its reservation goes now
            else:
                log.info("twilio stream status %s", event)
        return Response(status_code=204)

    async def stream_ended(self, request: Request) -> Response:
        """``<Connect action>``: what the caller hears once the stream is over."""
        params = await self._params(request)
        if isinstance(params, Response):
            return params
        if not self._signed(request, params):
            return PlainTextResponse("invalid signature", status_code=403)
        call_sid = str(params.get("CallSid", ""))
        await self._forget(params)  # the stream is over: a reservation never claimed goes now
        try:
            outcome = await self._admission.outcome(call_sid) if call_sid else None
        except StoreUnavailable:
            outcome = None
        self._drain.action_answered(call_sid)
        tw = self._settings.twilio
        if outcome == DRAINED:
            xml = twiml.message_document(tw.drain_message, self._voice)
        elif outcome == "no_capacity":
            xml = twiml.busy_document(tw.busy_message, self._voice)
        elif outcome in APOLOGISE_AFTER or outcome is None:
            # None: the stream never reached us or was refused; say sorry rather than leave silence.
            xml = twiml.message_document(tw.fallback_message, self._voice)
        else:
            xml = twiml.hangup_document()
        with oplog.call_context(call_sid=call_sid):
            log.info("stream ended, outcome %s", outcome or "unknown")
        return Response(xml, media_type=TWIML_MEDIA_TYPE)

    async def _forget(self, params: Mapping[str, Any]) -> None:
        call_sid = str(params.get("CallSid", ""))
        if call_sid:
            await self._admission.forget(call_sid)


def _ws_scheme(base: str) -> str:
    parts = urlsplit(base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"
