"""bench/naive_bridge.py, the capacity baseline, carries a real call: a baseline that fails would make every
ratio bench/capacity.py prints meaningless."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import assert_two_calls_echoed

pytestmark = pytest.mark.timeout(30)


async def test_naive_bridge_echoes_the_caller_through_the_ai(start_bench_server: Callable[[str, str], str]) -> None:
    await assert_two_calls_echoed(start_bench_server("naive_bridge.py", "naive-1,naive-2"))
