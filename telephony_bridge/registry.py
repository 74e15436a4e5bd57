"""The calls this replica is bridging now: for /status, /readyz and graceful drain."""

from __future__ import annotations

from typing import Any, Protocol


class CallView(Protocol):
    def status(self) -> dict[str, Any]: ...

    def end(self, outcome: str, reason: str) -> None:
        """Ask the call to end soon, politely, with this outcome (it closes its own sockets)."""


class CallRegistry:
    def __init__(self) -> None:
        self._calls: dict[str, CallView] = {}
        self._ending: tuple[str, str] | None = None  # once every call is told to end, so is each newcomer

    def add(self, call_sid: str, call: CallView) -> None:
        self._calls[call_sid] = call
        if self._ending is not None:
            call.end(*self._ending)

    def remove(self, call_sid: str) -> None:
        self._calls.pop(call_sid, None)

    def end_all(self, outcome: str, reason: str) -> None:
        """End every call, and every call added from now on (the drain deadline has passed)."""
        self._ending = (outcome, reason)
        for call in list(self._calls.values()):
            call.end(outcome, reason)

    def call_sids(self) -> list[str]:
        return list(self._calls)

    def __len__(self) -> int:
        return len(self._calls)

    def snapshot(self) -> list[dict[str, Any]]:
        return [call.status() for call in self._calls.values()]
