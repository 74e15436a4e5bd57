"""bench/tls_relay.py, behind ``setup_cost.py --tls`` and ``capacity.py --savants-tls``: what a client sends over
TLS reaches the server behind it and comes back, with the relay in a thread or in a process of its own."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from pathlib import Path

import pytest

from tests.support import BENCH, tool

sys.path.insert(0, str(BENCH))
from tls_relay import TlsRelay  # bench/ is no package: imported from its folder

TIMEOUT_S = 10


@pytest.fixture(autouse=True)
def _openssl() -> None:
    tool("openssl")  # the relay's certificate


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_tls_relay_carries_bytes_both_ways_to_a_client_that_trusts_its_bundle(
    process: bool, tmp_path: Path
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        relay = TlsRelay(server.sockets[0].getsockname()[1], tmp_path, process=process)
        try:
            trusting = ssl.create_default_context(cafile=str(relay.bundle))  # the system's CAs and the relay's
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port, ssl=trusting)
            message = os.urandom(100_000)
            writer.write(message)
            await writer.drain()
            assert await reader.readexactly(len(message)) == message
            writer.close()
            with pytest.raises(ssl.SSLCertVerificationError):  # not trusted: so the bundle is what trusts it
                await asyncio.open_connection("127.0.0.1", relay.port, ssl=ssl.create_default_context())
        finally:
            relay.close()
            server.close()
