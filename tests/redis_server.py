"""A real, throwaway ``redis-server`` on a free 127.0.0.1 port, for tests that need the real thing.

Plain functions, no pytest: a fixture wraps ``running_redis()`` wherever it is wanted.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 5.0


class RedisServerMissing(RuntimeError):
    """No ``redis-server`` executable on PATH."""


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop the server (idempotent); tests call it early to see Redis go away under a live client."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick); also what a test uses for "Redis is down"."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ping(port: int, timeout_s: float = 0.5) -> bool:
    """Whether a Redis answers PING on this port (inline command: no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """Start ``redis-server`` (no persistence) in a temp dir, wait for PING, yield it, stop it.

    Raises ``RedisServerMissing`` if the executable is absent, ``RuntimeError`` (with its log) if it never
    answers.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise RedisServerMissing("redis-server is not on PATH (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="tb-redis-") as tmp:
        log_path = Path(tmp) / "redis.log"
        port = free_port()
        args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--logfile", str(log_path)]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        server = RedisServer(port, subprocess.Popen(args, stdin=subprocess.DEVNULL), log_path)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not ping(port):
                if server.process.poll() is not None or time.monotonic() > deadline:
                    log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                    raise RuntimeError(f"redis-server on port {port} did not answer PING:\n{log}")
                time.sleep(0.01)  # polling a child process we started; nothing to await on
            yield server
        finally:
            server.stop()
