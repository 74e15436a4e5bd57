"""Whether the Savants token endpoint works, for ``/readyz``: learned from the real token requests, and while
it is failing, from a probe at most every ``probe_interval_s``.

A probe is never a token request: it posts an empty JSON object, which a working endpoint refuses with 400
``INVALID_REQUEST`` (spec §3.3) without counting it against any device. A 4xx means the endpoint is up; a 5xx,
a timeout, no connection, or a 2xx/3xx (no Savants answers an empty body so: a wrong URL) means it is not.
Without the probe a replica taken out of rotation for a token outage would never see another call, so never
learn that the outage is over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from telephony_bridge.clock import Clock

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[str | None]]  # None: the endpoint answered; else what went wrong


class TokenEndpointHealth:
    def __init__(self, clock: Clock, *, probe_interval_s: float = 10.0) -> None:
        self._clock = clock
        self._probe_interval_s = probe_interval_s
        self._probe: Probe | None = None
        self._probing: asyncio.Task[None] | None = None
        self._last_probe_at = float("-inf")
        self._news = 0  # real results so far: a probe's counts only if none came while it ran
        self.last_error: str | None = None  # None: healthy

    def attach_probe(self, probe: Probe) -> None:
        self._probe = probe

    def record_success(self) -> None:
        self._news += 1
        self._succeeded()

    def record_failure(self, error: str) -> None:
        self._news += 1
        if self.last_error is None:
            log.error("Savants token endpoint failing: %s; not ready for new calls until it answers", error)
        self.last_error = error
        self._last_probe_at = self._clock.monotonic()  # a real failure is as good as a probe: wait a full interval

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
            self._succeeded()
        else:
            self.last_error = error

    def _succeeded(self) -> None:
        if self.last_error is not None:
            log.warning("Savants token endpoint answers again")
        self.last_error = None

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)
