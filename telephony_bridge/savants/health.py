"""Whether the Savants endpoints work, for ``/readyz``: learned from real requests, and while one is failing,
from a probe at most every ``probe_interval_s``. Without the probe a replica taken out of rotation for an
outage would never see another call, so never learn that the outage is over.

Two endpoints are watched, each with an ``EndpointHealth``:

- The token endpoint (``TokenClient`` reports each request). Its probe is never a token request: it posts an
  empty JSON object, which a working endpoint refuses with 400 ``INVALID_REQUEST`` (spec §3.3) without counting
  it against any device.
- The voice stream (``watch_voice_stream`` wraps the connector every session is opened with). A session
  confirmed, or refused in-band (an ``error`` message, a close with an application's code: Savants answered
  and judged the token, as does an upgrade refused with 401, 403 or 429), means the endpoint works; no
  connection, an upgrade refused with any other status, a close for a server-side reason (1001, 1011-1014, 45xx,
  no close frame), Savants' ``SERVER_ERROR``-like codes, or no confirmation within the configured timeout mean
  it does not. Its probe is a WebSocket upgrade closed at once with 1000, before any token: no token spent, no
  device's socket taken (spec §6.1-6.2). It proves less than a session does (see ``EndpointHealth``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from telephony_bridge.clock import Clock
from telephony_bridge.errors import SessionError
from telephony_bridge.savants.client import Connector, SavantsConnection
from telephony_bridge.savants.retry import http_status

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[str | None]]  # None: the endpoint answered; else what went wrong

TRIP_AFTER = 3  # real failures in a row before an endpoint counts as failing
MAX_BACKOFF = 8  # the probe interval grows up to this many times the configured one (``EndpointHealth``)
# Session errors that say the voice stream itself is failing, rather than refusing one token or device.
STREAM_FAILURES = frozenset({"CONNECT_FAILED", "SERVER_ERROR", "INTERNAL_ERROR", "SERVICE_UNAVAILABLE"})
TIMEOUTS = frozenset({"CONNECT_TIMEOUT", "CONFIRM_TIMEOUT"})  # failures too, at the configured timeout
# Close codes for a server-side end (RFC 6455 §7.4.1: going away, internal error, restart, try again later, bad
# gateway); None: the connection ended without a close frame.
SERVER_SIDE_CLOSES = frozenset({None, 1001, 1006, 1011, 1012, 1013, 1014})
# Upgrade refusals that judge us, not Savants' health (spec §6.1, §8): authentication, access (a device over its
# sockets may be told so), a rate. Any other status (5xx, 408, or 400/404/2xx/3xx: a wrong URL) means no session
# can open. Private close codes read as 4000 + an HTTP status (savants/retry.py): 45xx is Savants failing.
REFUSALS_OF_US = frozenset({401, 403, 429})


class EndpointHealth:
    """One endpoint's state: working until ``trip_after`` real requests in a row fail, then failing until a request
    or a probe works.

    One failure alone is no outage: a replica out of rotation turns every caller away (the load balancer has
    nowhere else to send them when the others see the same), so a lone timeout among hundreds of calls must not
    do that. A probe proves less than a real request (the voice stream's never authenticates, so Savants failing
    in-band after the upgrade passes it): each time a probe's all-clear is followed by the endpoint failing again
    before any real request has worked, the interval between probes doubles, up to ``MAX_BACKOFF`` times the
    configured one, so such an outage keeps the replica out most of the time rather than letting calls in to fail
    every interval; a real success sets it back."""

    def __init__(
        self, name: str, clock: Clock, *, probe_interval_s: float = 10.0, trip_after: int = TRIP_AFTER
    ) -> None:
        """``name``: how log lines call the endpoint ("Savants token endpoint")."""
        self.name = name
        self._clock = clock
        self._base_interval_s = self._probe_interval_s = probe_interval_s
        self._trip_after = trip_after
        self._probe: Probe | None = None
        self._probing: asyncio.Task[None] | None = None
        self._last_probe_at = float("-inf")
        self._news = 0  # real results so far: a probe's counts only if none came while it ran
        self._failures = 0  # real failures in a row
        self._cleared_by_probe = False  # the last all-clear was a probe's, with no real success since
        self.last_error: str | None = None  # None: working

    def attach_probe(self, probe: Probe) -> None:
        self._probe = probe

    def record_success(self) -> None:
        self._news += 1
        self._cleared_by_probe = False
        self._probe_interval_s = self._base_interval_s
        self._succeeded()

    def record_failure(self, error: str) -> None:
        self._news += 1
        self._failures += 1
        if self.last_error is None:
            if self._failures < self._trip_after:
                return
            if self._cleared_by_probe:  # the probe's all-clear was wrong: probe less often
                self._probe_interval_s = min(self._probe_interval_s * 2, self._base_interval_s * MAX_BACKOFF)
            log.error("%s failing: %s; not ready for new calls until it answers", self.name, error)
        self.last_error = error
        self._last_probe_at = self._clock.monotonic()  # a real failure is as good as a probe: wait a full interval

    @property
    def up(self) -> bool:
        """Whether the endpoint works, as last learned; unlike ``healthy`` it never starts a probe."""
        return self.last_error is None

    def status(self) -> dict[str, object]:
        """For ``/status``: whether it works, the last failure while it does not, and how often it is probed then."""
        return {"up": self.up, "last_error": self.last_error, "probe_interval_s": self._probe_interval_s}

    def healthy(self) -> bool:
        """Cheap: no I/O. While failing, starts one background probe if the last one is old enough."""
        if self.last_error is None:
            return True
        due = self._clock.monotonic() - self._last_probe_at >= self._probe_interval_s
        if due and self._probe is not None and (self._probing is None or self._probing.done()):
            self._last_probe_at = self._clock.monotonic()
            self._probing = asyncio.get_running_loop().create_task(self._run_probe(self._probe))
        return False

    async def _run_probe(self, probe: Probe) -> None:
        """The probe's verdict, unless a real request's came while it ran (up to a request timeout): that one is
        newer, and the probe's must not undo it (a stale failure would take a working endpoint out of rotation,
        a stale success would put a failing one back)."""
        news = self._news
        error = await probe()
        if self._news != news:
            return
        if error is None:
            self._cleared_by_probe = True
            self._succeeded()
        else:
            self.last_error = error

    def _succeeded(self) -> None:
        self._failures = 0
        if self.last_error is not None:
            log.warning("%s answers again", self.name)
        self.last_error = None

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)


def stream_failure(exc: SessionError, timeout_s: float, configured_timeout_s: float) -> bool | None:
    """Whether a failed session open says the voice stream is failing (True), that it works and refused this
    token or device (False), or nothing (None): a timeout shorter than the configured one (a reconnect near its
    deadline) is the call's haste, not the endpoint's slowness."""
    if exc.code in TIMEOUTS:
        return True if timeout_s >= configured_timeout_s else None
    if exc.code in STREAM_FAILURES:
        return True
    if exc.code.startswith("HTTP_"):  # an upgrade refused: about us (a key, a device, a rate), or Savants failing
        return http_status(exc) not in REFUSALS_OF_US
    if exc.code == "CLOSED":
        close = exc.close_code
        return close in SERVER_SIDE_CLOSES or (close is not None and 4500 <= close < 4600)
    return False


def watch_voice_stream(connect: Connector, health: EndpointHealth, configured_timeout_s: float) -> Connector:
    """``connect``, telling ``health`` how each session open went (``stream_failure``). A cancelled open (the
    caller hung up meanwhile) and failures that are not the session's (a bug) tell it nothing."""

    async def watched(url: str, token: str, timeout_s: float) -> SavantsConnection:
        try:
            connection = await connect(url, token, timeout_s)
        except SessionError as exc:
            failing = stream_failure(exc, timeout_s, configured_timeout_s)
            if failing:
                health.record_failure(f"{exc.code}: {exc}")
            elif failing is not None:
                health.record_success()
            raise
        health.record_success()
        return connection

    return watched
