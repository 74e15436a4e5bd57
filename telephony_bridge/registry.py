"""The calls this replica is bridging now: for /status, /readyz and graceful drain, and one live stream per call.

A CallSid has at most one live stream here, by construction: ``claim`` takes the SID for one call before that
call does anything else (no await between the check and the take), a second ``start`` for the same SID is
refused, and ``release`` frees the SID only for the call that holds it. Two streams therefore never share a
device lease or free each other's: the lease, the AI session and the /status entry all belong to the first.
Across replicas, the stream token (one use, in the shared store) gives the same guarantee.
"""

from __future__ import annotations

from typing import Any, Protocol


class CallView(Protocol):
    def status(self) -> dict[str, Any]: ...


class CallRegistry:
    def __init__(self) -> None:
        self._calls: dict[str, CallView] = {}

    def claim(self, call_sid: str, call: CallView) -> bool:
        """Register ``call`` under ``call_sid``; False (nothing changed) if another live call holds the SID."""
        if call_sid in self._calls:
            return self._calls[call_sid] is call
        self._calls[call_sid] = call
        return True

    def release(self, call_sid: str, call: CallView) -> None:
        """Forget ``call``; a call that never held the SID (a refused duplicate) frees nothing."""
        if self._calls.get(call_sid) is call:
            del self._calls[call_sid]

    def __len__(self) -> int:
        return len(self._calls)

    def snapshot(self) -> list[dict[str, Any]]:
        return [call.status() for call in self._calls.values()]
