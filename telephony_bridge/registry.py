"""The calls this replica is bridging now: for /status, /readyz and graceful drain, and one live stream per call.

A CallSid has at most one live stream here, by construction: ``claim`` takes the SID for one call before that
call does anything else (no await between the check and the take), a second ``start`` for the same SID is
refused, and ``release`` frees the SID only for the call that holds it. Two streams therefore never share a
device lease or free each other's: the lease, the AI session and the /status entry all belong to the first.
Across replicas the call core also claims the call in the shared store (``Admission.claim_stream``).
"""

from __future__ import annotations

from typing import Any, Protocol


class CallView(Protocol):
    def status(self) -> dict[str, Any]: ...

    def end(self, outcome: str, reason: str) -> None:
        """Ask the call to end soon, politely, with this outcome (it closes its own sockets)."""

    @property
    def requests_after_end(self) -> bool:
        """Its ingress asks us something after the call has ended (``leg.CallerLeg.requests_after_end``)."""
        ...


class CallRegistry:
    def __init__(self) -> None:
        self._calls: dict[str, CallView] = {}
        self._ending: tuple[str, str] | None = None  # once every call is told to end, so is each newcomer

    def claim(self, call_sid: str, call: CallView) -> bool:
        """Register ``call`` under ``call_sid``; False (nothing changed) if another live call holds the SID."""
        if call_sid in self._calls:
            return self._calls[call_sid] is call
        self._calls[call_sid] = call
        if self._ending is not None:
            call.end(*self._ending)
        return True

    def release(self, call_sid: str, call: CallView) -> None:
        """Forget ``call``; a call that never held the SID (a refused duplicate) frees nothing."""
        if self._calls.get(call_sid) is call:
            del self._calls[call_sid]

    def end_all(self, outcome: str, reason: str) -> None:
        """End every call, and every call added from now on (the drain deadline has passed)."""
        self._ending = (outcome, reason)
        for call in list(self._calls.values()):
            call.end(outcome, reason)

    def call_sids(self) -> list[str]:
        return list(self._calls)

    def requesting_after_end(self) -> list[str]:
        """The calls whose ingress will ask us something once they have ended (Twilio's, not SIP's)."""
        return [sid for sid, call in self._calls.items() if call.requests_after_end]

    def __len__(self) -> int:
        return len(self._calls)

    def snapshot(self) -> list[dict[str, Any]]:
        return [call.status() for call in self._calls.values()]
