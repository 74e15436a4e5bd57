"""The calls this replica is bridging now: for /status, /readyz and graceful drain."""

from __future__ import annotations

from typing import Any, Protocol


class CallView(Protocol):
    def status(self) -> dict[str, Any]: ...


class CallRegistry:
    def __init__(self) -> None:
        self._calls: dict[str, CallView] = {}

    def add(self, call_sid: str, call: CallView) -> None:
        self._calls[call_sid] = call

    def remove(self, call_sid: str) -> None:
        self._calls.pop(call_sid, None)

    def __len__(self) -> int:
        return len(self._calls)

    def snapshot(self) -> list[dict[str, Any]]:
        return [call.status() for call in self._calls.values()]
