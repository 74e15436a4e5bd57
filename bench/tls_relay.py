"""A TLS-terminating TCP relay on 127.0.0.1 in front of the Savants emulator: the bridge then reaches its voice
stream over ``wss://``, as it reaches Savants (``bench/setup_cost.py --tls``, ``bench/capacity.py --savants-tls``).

The certificate is made for the run by openssl's command line; the bridge trusts it through ``SSL_CERT_FILE``
(``bundle``: the system's CA bundle with it appended, so that building a default TLS context costs the bridge what
it costs in production). The relay runs on its own event loop, in a daemon thread of this process or in a process
of its own (``process=True``, pinned to ``cpus`` if given), so its CPU is never the bridge's.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import ssl
import subprocess
import threading
from multiprocessing.connection import Connection
from pathlib import Path


def make_certificate(folder: Path, openssl: str = "openssl") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, valid for a day, made by openssl's command line in ``folder``:
    (certificate, key)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    request = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    names = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    where = ["-keyout", str(key), "-out", str(cert), "-days", "1"]
    subprocess.run([*request, *where, *names], check=True, capture_output=True)
    return cert, key


class TlsRelay:
    """One relay, up once constructed: clients connect to ``port`` and trust ``bundle``; ``close()`` stops it."""

    def __init__(
        self, target_port: int, folder: Path, *, process: bool = False, cpus: frozenset[int] | None = None
    ) -> None:
        self.cert, self._key = make_certificate(folder)
        self.bundle = folder / "bundle.pem"  # the system's CAs and ours, so a default context costs what it costs
        system = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
        self.bundle.write_bytes(system.read_bytes() + b"\n" + self.cert.read_bytes())
        self._process: multiprocessing.process.BaseProcess | None = None
        receiving, sending = multiprocessing.Pipe(duplex=False)
        args = (self.cert, self._key, target_port, sending, cpus)
        if process:  # spawned, not forked: this process may have threads (a fork of those may deadlock)
            self._process = multiprocessing.get_context("spawn").Process(target=_run, args=args, daemon=True)
            self._process.start()
        else:
            threading.Thread(target=_run, args=args, daemon=True, name="tls-relay").start()
        if not receiving.poll(10):
            self.close()
            raise SystemExit("the TLS relay did not start")
        self.port: int = receiving.recv()

    def env(self) -> dict[str, str]:
        """What a server's environment needs to reach the emulator's voice stream through the relay, trusting it."""
        return {"SAVANTS_WS_URL": f"wss://127.0.0.1:{self.port}/voice-stream", "SSL_CERT_FILE": str(self.bundle)}

    def close(self) -> None:
        """Stop the relay's process (a thread, a daemon, ends with this process: tests and setup_cost.py)."""
        if self._process is not None:
            self._process.terminate()
            self._process.join()


def _run(cert: Path, key: Path, target_port: int, started: Connection, cpus: frozenset[int] | None) -> None:
    """The relay's event loop (in a thread, or the whole of a spawned process): tells ``started`` its port."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    asyncio.run(_serve(cert, key, target_port, started))


async def _serve(cert: Path, key: Path, target_port: int, started: Connection) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()  # the emulator is gone: so is this client's connection
            return
        await asyncio.gather(_pump(reader, target_writer), _pump(target_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    started.send(server.sockets[0].getsockname()[1])
    await server.serve_forever()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
