"""bench/relay_floor.py, capacity.py's floor of a whole call (``relay-picows``), carries a real call both ways:
a floor that lost audio would cost less than any bridge could, and say nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import assert_two_calls_echoed

pytestmark = pytest.mark.timeout(30)


async def test_relay_floor_echoes_the_caller_through_the_ai(start_bench_server: Callable[[str, str], str]) -> None:
    await assert_two_calls_echoed(start_bench_server("relay_floor.py", "relay-1,relay-2"))
