"""The calls this replica is bridging now: for /status, /readyz and graceful drain."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class CallView(Protocol):
    def status(self) -> dict[str, Any]: ...


class CallRegistry:
    def __init__(self) -> None:
        self._calls: dict[str, CallView] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, call_sid: str, call: CallView) -> None:
        self._calls[call_sid] = call
        self._empty.clear()

    def remove(self, call_sid: str) -> None:
        self._calls.pop(call_sid, None)
        if not self._calls:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, call_sid: object) -> bool:
        return call_sid in self._calls

    def snapshot(self) -> list[dict[str, Any]]:
        return [call.status() for call in self._calls.values()]

    async def wait_empty(self) -> None:
        await self._empty.wait()
