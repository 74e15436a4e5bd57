"""What Twilio does around the media stream, for one simulated inbound call (spec §1, §2.3, §2.4, §5).

``place_call`` posts the signed voice webhook and reads the TwiML it gets back. ``run_flow`` then opens the
``<Connect><Stream>`` that document names, plays the call with ``SimulatedCall``, and once the bridge has ended
the stream asks ``<Connect action>`` what the caller hears next. Without an action, the verbs after
``</Connect>`` run (§2.4). URLs in the TwiML are public: requests go to the bridge's local address with the
same path, but signatures cover the public URL exactly as given. A bridge behind a proxy sees the same (§5.4).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import httpx
import numpy as np
import numpy.typing as npt
from twilio.request_validator import RequestValidator
from websockets.exceptions import WebSocketException

from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.errors import BridgeError
from telephony_bridge.tools.caller import CallConfig, CallResult, new_sid, run_call

VOICE_PATH = "/voice"
SIGNATURE_HEADER = "X-Twilio-Signature"
API_VERSION = "2010-04-01"
SAY_SHOWN_CHARS = 40  # a summary shows the start of each <Say>

Outcome = Literal["served", "busy", "failed"]
# Plays one media stream: ``caller.run_call`` by default; bench/lean_callers.py passes its cheaper callers.
StreamRunner = Callable[[CallConfig], Awaitable[CallResult]]


class FlowError(BridgeError):
    """The bridge answered one of Twilio's requests with something Twilio could not use."""


# --- TwiML as values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connect:
    """``<Connect><Stream>``: the stream to open, its ``<Parameter>``s verbatim, and where Twilio reports."""

    stream_url: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    status_callback: str | None = None
    action: str | None = None
    method: str = "POST"  # how ``action`` is requested (§2.3)


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Hangup:
    pass


@dataclass(frozen=True)
class Reject:
    reason: str = "rejected"


@dataclass(frozen=True)
class Other:
    """A verb this caller does not act on (``Pause``, ``Dial``, ``Start``…): kept by name, never an error."""

    name: str


Verb = Connect | Say | Hangup | Reject | Other


@dataclass(frozen=True)
class Twiml:
    verbs: tuple[Verb, ...] = ()

    @property
    def connect(self) -> Connect | None:
        return next((verb for verb in self.verbs if isinstance(verb, Connect)), None)

    def after_connect(self) -> Twiml:
        """What runs when the stream closes and ``<Connect>`` has no action: the verbs after it (§2.4)."""
        for i, verb in enumerate(self.verbs):
            if isinstance(verb, Connect):
                return Twiml(self.verbs[i + 1 :])
        return Twiml()

    def describe(self) -> str:
        """``Say "Sorry, we lost…" + Hangup``; an empty document hangs up (§2.4)."""
        return " + ".join(_describe(verb) for verb in self.verbs) or "hang up"


def _describe(verb: Verb) -> str:
    match verb:
        case Connect(stream_url=url):
            return f"Connect {url}"
        case Say(text=text):
            shown = text if len(text) <= SAY_SHOWN_CHARS else text[: SAY_SHOWN_CHARS - 1] + "…"
            return f'Say "{shown}"'
        case Hangup():
            return "Hangup"
        case Reject(reason=reason):
            return f"Reject {reason}"
        case Other(name=name):
            return name


def parse_twiml(text: str) -> Twiml:
    """Read a TwiML document; raises ``FlowError`` when it is not XML with a ``<Response>`` root."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise FlowError(f"expected a TwiML document, got unparsable XML ({exc}): {text[:80]!r}") from exc
    if root.tag != "Response":
        raise FlowError(f"expected a TwiML <Response>, got <{root.tag}>")
    return Twiml(tuple(_verb(element) for element in root))


def _verb(element: ET.Element) -> Verb:
    match element.tag:
        case "Say":
            return Say("".join(element.itertext()).strip())
        case "Hangup":
            return Hangup()
        case "Reject":
            return Reject(element.get("reason", "rejected"))
        case "Connect" if (stream := element.find("Stream")) is not None and stream.get("url"):
            return Connect(
                stream_url=stream.get("url", ""),
                parameters={p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")},
                status_callback=stream.get("statusCallback"),
                action=element.get("action"),
                method=element.get("method", "POST").upper(),
            )
    return Other(element.tag)


# --- URLs and signatures -----------------------------------------------------------------------------------


def http_base(ws_url: str) -> str:
    """``ws://HOST:PORT/media-stream`` → ``http://HOST:PORT`` (``wss`` → ``https``): where the webhooks are."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def local_url(url: str, bridge_http_url: str, public_url: str | None = None) -> str:
    """A URL from the TwiML, moved to the bridge's local address: same path and query, the bridge's host.

    WebSocket URLs stay WebSocket URLs. A path under ``public_url``'s own path loses that prefix, because
    the ingress strips it (``SignatureChecker`` adds it back the same way).
    """
    parts, bridge = urlsplit(url), urlsplit(bridge_http_url)
    path = parts.path
    if public_url:
        public = urlsplit(public_url)
        prefix = public.path.rstrip("/")
        if parts.netloc == public.netloc and prefix and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix) :] or "/"
    scheme = bridge.scheme
    if parts.scheme in ("ws", "wss"):
        scheme = "wss" if bridge.scheme == "https" else "ws"
    return urlunsplit((scheme, bridge.netloc, path, parts.query, ""))


def _websocket_url(url: str) -> str:
    """A relative ``<Stream url>`` resolves against the webhook's https URL; Twilio opens it over wss."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return url  # absolute ws/wss: kept exactly as given, since that is what gets signed
    return urlunsplit(parts._replace(scheme="wss" if parts.scheme == "https" else "ws"))


def sign(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """``X-Twilio-Signature`` as Twilio computes it: HMAC-SHA1 over the URL plus sorted params (§5.1)."""
    return RequestValidator(auth_token).compute_signature(url, dict(params))


def call_params(call_sid: str, account_sid: str, from_: str, to: str, status: str) -> dict[str, str]:
    """The standard parameters of every call request Twilio makes (§1); the bridge reads CallSid, From, To."""
    return {
        "AccountSid": account_sid,
        "ApiVersion": API_VERSION,
        "CallSid": call_sid,
        "CallStatus": status,
        "Called": to,
        "CalledCountry": "US",
        "Caller": from_,
        "CallerCountry": "US",
        "Direction": "inbound",
        "From": from_,
        "FromCountry": "US",
        "To": to,
        "ToCountry": "US",
    }


async def _request_twiml(
    http: httpx.AsyncClient,
    public: str,
    local: str,
    params: Mapping[str, str],
    auth_token: str | None,
    method: str = "POST",
) -> Twiml:
    """One signed Twilio request for TwiML. A GET carries the params in its signed URL, a POST in its form."""
    headers = {"User-Agent": "TwilioProxy/1.1"}
    if method == "GET":
        query = urlencode(params)
        public, local = (f"{u}{'&' if '?' in u else '?'}{query}" for u in (public, local))
    if auth_token:
        headers[SIGNATURE_HEADER] = sign(auth_token, public, params if method == "POST" else {})
    try:
        if method == "GET":
            response = await http.get(local, headers=headers)
        else:
            response = await http.post(local, data=dict(params), headers=headers)
    except httpx.HTTPError as exc:
        raise FlowError(f"{method} {local} failed: {exc or type(exc).__name__}") from exc
    if response.status_code != 200:
        raise FlowError(f"{method} {local}: expected 200 with TwiML, got {response.status_code} {response.text[:80]!r}")
    return parse_twiml(response.text)


# --- one call ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    """A call the voice webhook has answered. ``url`` is the public URL it was signed over."""

    call_sid: str
    account_sid: str
    params: Mapping[str, str]
    url: str
    twiml: Twiml


async def place_call(
    bridge_http_url: str,
    *,
    http: httpx.AsyncClient,
    public_url: str | None = None,
    auth_token: str | None = None,
    from_: str = "+15005550006",
    to: str = "+15005550001",
    call_sid: str | None = None,
    account_sid: str | None = None,
) -> Placed:
    """Ring the bridge: a signed ``POST /voice`` as Twilio sends it (§1, §5.1); raises ``FlowError``."""
    call_sid, account_sid = call_sid or new_sid("CA"), account_sid or new_sid("AC")
    params = call_params(call_sid, account_sid, from_, to, "ringing")
    public = (public_url or bridge_http_url).rstrip("/") + VOICE_PATH
    local = bridge_http_url.rstrip("/") + VOICE_PATH
    twiml = await _request_twiml(http, public, local, params, auth_token)
    return Placed(call_sid, account_sid, params, public, twiml)


@dataclass(frozen=True)
class FlowResult:
    """One call from ringing to hang-up."""

    call_sid: str
    webhook: Twiml | None  # what /voice answered; None if it failed
    call: CallResult | None  # the media stream; None if none was opened (turned away, or failed)
    after: Twiml | None  # what ran after the bridge ended the stream; None when the caller hung up
    error: str | None = None  # why the flow stopped short

    @property
    def outcome(self) -> Outcome:
        """``busy``: the webhook turned the call away (``Reject``, or ``Say`` + ``Hangup`` with no stream).
        ``failed``: a request or the stream failed, or the bridge ended the stream and then apologised
        (a ``<Say>`` after it), meaning the AI did not take the call. Otherwise ``served``."""
        if self.error is not None:
            return "failed"
        if self.call is None:
            return "busy"
        if self.call.ended_by == "bridge" and self.after and any(isinstance(v, Say) for v in self.after.verbs):
            return "failed"
        return "served"

    @property
    def reason(self) -> str:
        """Why the call was not served, in a phrase ("" when it was)."""
        if self.error is not None:
            return self.error
        if self.call is None and self.webhook is not None:
            return self.webhook.describe()
        if self.outcome == "failed" and self.call is not None and self.after is not None:
            return f"the bridge ended the stream after {self.call.duration_s:.2f} s, then: {self.after.describe()}"
        return ""

    def summary(self) -> str:
        """One line: the stream's figures, or why there was none, and what the caller heard afterwards."""
        if self.call is not None:
            line = self.call.summary()
        elif self.error is not None:
            line = f"call {self.call_sid} failed: {self.error}"
        else:
            line = f"call {self.call_sid} turned away by the webhook: {self.reason}"
        return line + (f"; then: {self.after.describe()}" if self.after is not None else "")


async def run_flow(
    bridge_http_url: str,
    *,
    http: httpx.AsyncClient,
    audio_in: npt.NDArray[np.int16] | None = None,
    seconds: float = 10.0,
    auth_token: str | None = None,
    public_url: str | None = None,
    from_: str = "+15005550006",
    to: str = "+15005550001",
    call_sid: str | None = None,
    clock: Clock | None = None,
    open_timeout_s: float = 10.0,
    run_stream: StreamRunner = run_call,
) -> FlowResult:
    """One whole call: webhook, stream, and what follows it. Failures of the bridge are in the result.

    ``run_stream`` plays the stream; it raises what ``run_call`` raises when the stream cannot be opened."""
    call_sid, account_sid = call_sid or new_sid("CA"), new_sid("AC")
    try:
        placed = await place_call(
            bridge_http_url,
            http=http,
            public_url=public_url,
            auth_token=auth_token,
            from_=from_,
            to=to,
            call_sid=call_sid,
            account_sid=account_sid,
        )
    except FlowError as exc:
        return FlowResult(call_sid, None, None, None, f"webhook: {exc}")
    connect = placed.twiml.connect
    if connect is None:
        return FlowResult(call_sid, placed.twiml, None, None)

    # Twilio opens the URL as the TwiML gives it and signs exactly that, with no params (§5.2).
    stream_url = _websocket_url(urljoin(placed.url, connect.stream_url))
    config = CallConfig(
        local_url(stream_url, bridge_http_url, public_url),
        audio_in=audio_in,
        seconds=seconds,
        custom_parameters=dict(connect.parameters),
        headers={SIGNATURE_HEADER: sign(auth_token, stream_url, {})} if auth_token else {},
        clock=clock or SystemClock(),
        open_timeout_s=open_timeout_s,
        account_sid=account_sid,
        call_sid=call_sid,
    )
    call: CallResult | None = None
    errors: list[str] = []
    try:
        call = await run_stream(config)
    except (OSError, TimeoutError, WebSocketException) as exc:
        errors.append(f"stream {config.url}: {exc or type(exc).__name__}")
    if call is not None and call.ended_by == "caller":
        return FlowResult(call_sid, placed.twiml, call, None)

    # The stream is over but the call is not: <Connect> has ended, a refused stream included (§2.4, §5.2).
    after: Twiml | None = placed.twiml.after_connect()
    if connect.action:
        action = urljoin(placed.url, connect.action)
        params = call_params(call_sid, account_sid, from_, to, "in-progress")
        local = local_url(action, bridge_http_url, public_url)
        try:
            after = await _request_twiml(http, action, local, params, auth_token, connect.method)
        except FlowError as exc:
            after = None
            errors.append(f"action: {exc}")
    return FlowResult(call_sid, placed.twiml, call, after, "; ".join(errors) or None)
