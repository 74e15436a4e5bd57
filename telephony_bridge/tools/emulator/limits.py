"""The two per-device limits of spec §8: token requests in a rolling window, and concurrent sockets.

Both are plain objects fed with times from the caller, so the app can use the injected clock and tests can
drive them without one. Neither is thread-safe: the emulator uses them from its single event loop.
"""

from __future__ import annotations

import math
from collections import deque

TOKEN_WINDOW_S = 60.0  # spec §5: "rolling 60-second window"


class RollingWindow:
    """At most ``limit`` admitted requests per key in any ``window_s`` seconds.

    Refused requests are not recorded: a client that waits the ``retry_after_s`` it was given is then
    admitted, which is what makes ``retryAfter`` truthful. (Spec §11.9 notes the docs also describe a fixed
    window; the rolling one is the stricter reading for clients.)
    """

    def __init__(self, limit: int, window_s: float = TOKEN_WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: dict[str, deque[float]] = {}

    def admit(self, key: str, now_s: float) -> float | None:
        """Record a request and return None, or refuse it and return the seconds until one would pass."""
        times = self._times.setdefault(key, deque())
        self._expire(times, now_s)
        if len(times) >= self.limit:
            return times[0] + self.window_s - now_s
        times.append(now_s)
        return None

    def count(self, key: str, now_s: float) -> int:
        times = self._times.get(key)
        if times is None:
            return 0
        self._expire(times, now_s)
        if not times:
            del self._times[key]
        return len(times)

    def keys(self) -> list[str]:
        return list(self._times)

    def _expire(self, times: deque[float], now_s: float) -> None:
        while times and times[0] <= now_s - self.window_s:
            times.popleft()


def retry_after_whole_s(seconds: float) -> int:
    """Whole seconds, at least 1, rounded up so a client that waits exactly this long is admitted."""
    return max(1, math.ceil(seconds))


class ConcurrencyLimit:
    """At most ``limit`` holders per key; ``acquire`` and ``release`` must pair (the session uses finally)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        held = self._held.get(key, 0)
        if held >= self.limit:
            return False
        self._held[key] = held + 1
        return True

    def release(self, key: str) -> None:
        held = self._held[key] - 1
        if held:
            self._held[key] = held
        else:
            del self._held[key]

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def keys(self) -> list[str]:
        return list(self._held)
