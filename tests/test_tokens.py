"""The token client's HTTP path, on a real socket: one kept-alive connection to the token endpoint serves one
request after another, and a request searches for no module (httpcore's per-request ``import sniffio``, which
fails without sniffio installed, is a search of every import path each time: sniffio is a dependency for that)."""

from __future__ import annotations

import asyncio
import importlib.abc
import json
import sys
from collections.abc import AsyncIterator, Sequence
from types import ModuleType

import httpx
import pytest

from telephony_bridge.savants.tokens import TOKEN_PATH, TokenClient

pytestmark = pytest.mark.timeout(30)

JWT = "header.payload.signature"


class TokenEndpoint:
    """A keep-alive HTTP/1.1 token endpoint that counts the connections it accepted and the bodies it read."""

    def __init__(self) -> None:
        self.connections = 0
        self.bodies: list[dict[str, str]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                assert request_line == f"POST {TOKEN_PATH} HTTP/1.1", request_line
                headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
                self.bodies.append(json.loads(await reader.readexactly(int(headers["content-length"]))))
                body = json.dumps({"token": JWT}).encode()
                head_out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                writer.write(head_out % len(body) + body)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the client closed the connection
        finally:
            writer.close()


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[TokenEndpoint, str]]:
    served = TokenEndpoint()
    server = await asyncio.start_server(served.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield served, f"http://127.0.0.1:{port}"


class ImportSearches(importlib.abc.MetaPathFinder):
    """Records each module the import system goes looking for (a module already imported is never searched)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        self.names.append(fullname)
        return None  # the finders after this one do the finding


async def test_tokens_one_connection_serves_request_after_request(endpoint: tuple[TokenEndpoint, str]) -> None:
    served, base_url = endpoint
    async with asyncio.timeout(10), httpx.AsyncClient(trust_env=False) as http:
        tokens = TokenClient(http, base_url, "the-api-key")
        got = [await tokens.fetch(f"device-{i}") for i in range(5)]
    assert got == [JWT] * 5
    assert served.bodies == [{"apiKey": "the-api-key", "deviceId": f"device-{i}"} for i in range(5)]
    assert served.connections == 1


async def test_tokens_request_searches_for_no_module(endpoint: tuple[TokenEndpoint, str]) -> None:
    _, base_url = endpoint
    searches = ImportSearches()
    async with asyncio.timeout(10), httpx.AsyncClient(trust_env=False) as http:
        tokens = TokenClient(http, base_url, "the-api-key")
        await tokens.fetch("device-0")  # whatever the first request imports lazily, once
        sys.meta_path.insert(0, searches)
        try:
            for i in range(3):
                await tokens.fetch(f"device-{i}")
        finally:
            sys.meta_path.remove(searches)
    assert searches.names == []
