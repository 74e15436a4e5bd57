"""Helpers the tests share: settings for a bridge under test, what Twilio would send it, and the bench's servers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from twilio.request_validator import RequestValidator

from telephony_bridge.ops.heap import garbage_kind
from telephony_bridge.serving import ServerThread
from telephony_bridge.settings import Settings, load_settings
from telephony_bridge.tools.caller import CallConfig, CallResult, new_sid
from telephony_bridge.tools.emulator import STATS_PATH
from telephony_bridge.tools.loadtest import run_load
from tests.redis_server import free_port

DEVICE_IDS = ["device-a", "device-b"]
AUTH_TOKEN = "test-auth-token-0123456789abcdef"
PUBLIC_URL = "https://bridge.example.test"
STREAM_URL = "wss://bridge.example.test/media-stream"


def require_built(module: str, built: bool) -> None:
    """A compiled module's tests: without it, skip locally but fail under CI (the compiled path must be tested)."""
    if not built:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build and test {module} (is a C compiler installed?)")
        pytest.skip(f"{module} is not built here (no C compiler at install time)")


def instance_state(obj: object) -> dict[str, Any]:
    """Every attribute an instance holds: its dict's and its slots' (those the compiled frame path reads at their
    offsets, ``_pyattrs.h``), so that comparing two objects' states cannot miss either kind."""
    state = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                state[name] = getattr(obj, name)
    return state


def bridge_settings(emulator: ServerThread, **overrides: Any) -> Settings:
    """A production-shaped bridge: real Savants URL (the emulator), signatures on, PUBLIC_URL set."""
    values: dict[str, Any] = {
        "savants.base_url": emulator.http_url,
        "savants.api_key": "test-key",
        "savants.device_ids": DEVICE_IDS,
        "server.host": "127.0.0.1",
        "server.port": 0,
        "server.public_url": PUBLIC_URL,
        "twilio.auth_token": AUTH_TOKEN,
    }
    values.update(overrides)
    return load_settings(env={}, **values)


def emulator_stats(emulator: ServerThread) -> dict[str, Any]:
    return httpx.get(emulator.http_url + STATS_PATH, timeout=5).json()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll a condition another thread or process will make true; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def sign(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


def call_form(call_sid: str | None = None) -> dict[str, str]:
    return {
        "CallSid": call_sid or new_sid("CA"),
        "AccountSid": new_sid("AC"),
        "From": "+15551230000",
        "To": "+15559870000",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }


def post_voice(bridge: Served, form: dict[str, str], signature: str | None = "sign") -> httpx.Response:
    """POST /voice as Twilio does; ``signature="sign"`` signs over the public URL, None sends no header."""
    headers = {}
    if signature == "sign":
        headers["X-Twilio-Signature"] = sign(PUBLIC_URL + "/voice", form)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    return httpx.post(bridge.http_url + "/voice", data=form, headers=headers, timeout=10)


def stream_parameters(response: httpx.Response) -> dict[str, str]:
    root = ET.fromstring(response.text)
    return {p.attrib["name"]: p.attrib["value"] for p in root.iter("Parameter")}


def upgrade_signature(url: str = STREAM_URL) -> dict[str, str]:
    return {"X-Twilio-Signature": sign(url, {})}


def token_requests(emulator: ServerThread) -> int:
    return sum(d["token_requests_in_window"] for d in emulator_stats(emulator)["devices"].values())


def leases(bridge: Served) -> int:
    devices = httpx.get(bridge.http_url + "/status", timeout=5).json()["accounting"]["devices"]
    return sum(d["leases"] + d.get("reservations", 0) for d in devices.values())


def metric_values(bridge: ServerThread, name: str, label: str) -> dict[str, float]:
    """One metric's samples on /metrics, by the value of its one label ``label``."""
    text = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    return {value: float(sample) for value, sample in re.findall(rf'^{name}\{{{label}="([^"]*)"\}} (\S+)$', text, re.M)}


class Served(Protocol):
    """A bridge under test: in this process (``ServerThread``) or a child process."""

    http_url: str
    ws_url: str


def frames_a_stall_cost(result: CallResult) -> int:
    """At most how many frames of a call's tail a stall of the simulated caller's own beat cost it: its overdue
    ticks play at once, before the echoes are back, so all it hears after comes that much later, and what is
    still unheard at the end is lost. Each overdue tick but the last of a catch-up is in ``beat_stalls_s``."""
    late_ticks = len(result.beat_stalls_s)
    return late_ticks + 1 if late_ticks else 0


def signed_call(bridge: Served, form: dict[str, str] | None = None, **config: Any) -> CallConfig:
    """What Twilio does: a signed webhook, then the stream it names with its parameters, signed over wss://."""
    form = form or call_form()
    return CallConfig(
        url=bridge.ws_url + "/media-stream",
        call_sid=form["CallSid"],
        custom_parameters=stream_parameters(post_voice(bridge, form)),
        headers=upgrade_signature(),
        **config,
    )


def stream_callback(bridge: Served, path: str, form: dict[str, str]) -> httpx.Response:
    """A signed ``/stream-status`` or ``/stream-ended`` request, as Twilio sends it."""
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + path, form)}
    return httpx.post(bridge.http_url + path, data=form, headers=headers, timeout=5)


def stream_ended(bridge: ServerThread, call_sid: str) -> ET.Element:
    """What Twilio's ``<Connect action>`` request gets back once the stream is over."""
    form = {"CallSid": call_sid, "AccountSid": new_sid("AC"), "CallStatus": "in-progress"}
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/stream-ended", form)}
    return ET.fromstring(httpx.post(bridge.http_url + "/stream-ended", data=form, headers=headers, timeout=5).text)


# What the bridge reads from the environment: a child process starts from none of the test runner's own.
BRIDGE_VARIABLES = ("SAVANTS_", "TWILIO_", "PUBLIC_URL", "REDIS_URL", "HOST", "PORT", "OPS_", "BRIDGE_", "LOG_")


def _default_sigint() -> None:
    """In the child, before it runs: SIGINT as a terminal would send it. A test run started in the background by a
    non-interactive shell (``cmd &``) inherits SIGINT ignored, and so would the bridge, whose second Ctrl-C
    then does nothing (``tests/test_drain.py`` failed that way in a backgrounded CI run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class BridgeProcess:
    """``telephony-bridge serve`` in a child process, as production runs it; logs read back as JSON lines.

    With an ``emulator``, a production configuration against it; without one, only ``env`` (dev mode needs
    ``--dev`` in ``args``). ``command`` replaces ``python -m telephony_bridge`` (e.g. ``dev.py``).
    """

    def __init__(
        self,
        emulator: ServerThread | None,
        env: dict[str, str] | None = None,
        *,
        args: tuple[str, ...] = ("serve",),
        command: tuple[str, ...] = (sys.executable, "-m", "telephony_bridge"),
        cwd: Path | None = None,
    ) -> None:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(BRIDGE_VARIABLES)}
        production = (
            {
                "SAVANTS_BASE_URL": emulator.http_url,
                "SAVANTS_API_KEY": "test-key",
                "SAVANTS_DEVICE_IDS": ",".join(DEVICE_IDS),
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "PUBLIC_URL": PUBLIC_URL,
                "HOST": "127.0.0.1",
            }
            if emulator is not None
            else {}
        )
        env = {**inherited, **production, "PORT": "0", **(env or {})}
        self.proc = subprocess.Popen(
            [*command, *args], env=env, cwd=cwd, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
        )
        self.lines: list[dict[str, object]] = []
        self.port = 0
        self.ops_port = 0
        self.host = ""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if not line.startswith("{"):  # dev.py's own lines, if it had to install first
                continue
            record = json.loads(line)
            self.lines.append(record)
            message = str(record["msg"])
            if "bridge listening on" in message:  # one process, or the supervisor of several workers
                address = message.split("bridge listening on ", 1)[1]
                self.host, self.port = address.rsplit(":", 1)[0], int(address.rsplit(":", 1)[1])
            if message.startswith("ops listening on") and not self.ops_port:  # the shared one comes first
                self.ops_port = int(message.split()[3].rsplit(":", 1)[1])
            if message == "Application startup complete." and self.port:  # the bridge's, not dev mode's emulator
                break
        assert self.port, f"bridge did not start: {self.lines}"
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()  # reaps it and closes the pipe

    def finish(self, timeout_s: float) -> int:
        assert self.proc.stderr is not None
        _, rest = self.proc.communicate(timeout=timeout_s)
        self.lines += [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
        return self.proc.returncode


def tool(name: str) -> str:
    """A command-line tool the test needs: skipped where it is missing, but under CI its absence fails."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this check, but {name!r} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


BENCH = Path(__file__).resolve().parent.parent / "bench"
SPEECH_WAV = str(Path(__file__).resolve().parent / "data" / "speech_8k.wav")


@contextlib.contextmanager
def bench_server(script: str, emulator: ServerThread, device_ids: str) -> Iterator[str]:
    """``bench/<script>`` (a baseline of bench/capacity.py) in a child process against ``emulator``, with the
    environment capacity.py gives it; yields its media-stream URL once its ``/healthz`` answers."""
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "SAVANTS_BASE_URL": emulator.http_url,
        "SAVANTS_API_KEY": "test-key",  # the emulator fixture's key
        "SAVANTS_DEVICE_IDS": device_ids,
    }
    process = subprocess.Popen([sys.executable, str(BENCH / script)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, f"bench/{script} did not come up"
                time.sleep(0.1)
        yield f"ws://127.0.0.1:{port}/media-stream"
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


async def assert_two_calls_echoed(media_stream_url: str) -> None:
    """Two 2 s calls through a bench server against the emulator's echo voice: both served with no protocol
    violation, both heard the AI, and every round trip holds the echo's 0.2 s delay and nothing absurd."""
    async with asyncio.timeout(20):
        result = await run_load(media_stream_url, 2, 2, 2.0, 0.1, None, None, SPEECH_WAV, deadline_s=15)
    assert (len(result.of("served")), result.violations) == (2, 0), [f.reason for f in result.flows]
    assert len(result.first_audio_s) == 2
    assert result.round_trips_s and result.round_trips_s[0] >= 0.2 and result.round_trips_s[-1] < 1.0


# --- reference cycles -----------------------------------------------------------------------------------------

_OURS = ("telephony_bridge.", "picows.", "uvloop.")
_NOT_OURS = ("telephony_bridge.tools.",)  # the test tools playing callers and Savants


@contextlib.contextmanager
def collector_off() -> Iterator[Counter[str]]:
    """The cycle collector off while the body runs; then one collection, keeping what it finds, and the count of
    what was ours by type, a frame by its function and file:line (left in the counter yielded, freed after).
    What a call leaves in a cycle waits for a full collection, rare in a serving process (``ops/gc_tuning.py``):
    a frame there is usually an exception kept where its own traceback reaches, holding all its locals."""
    found: Counter[str] = Counter()
    gc.collect()
    debug, enabled = gc.get_debug(), gc.isenabled()
    gc.disable()
    try:
        yield found
        before = len(gc.garbage)
        gc.set_debug(debug | gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found.update(name for name in map(_ours, gc.garbage[before:]) if name)
        finally:
            del gc.garbage[before:]
    finally:
        gc.set_debug(debug)
        if enabled:
            gc.enable()


def _ours(obj: object) -> str | None:
    name = garbage_kind(obj)  # as /debug/heap names it
    if name.startswith("builtins.frame "):
        where = name.rpartition(" (")[2]
        return (
            name if where.startswith("telephony_bridge/") and not where.startswith("telephony_bridge/tools/") else None
        )
    return name if name.startswith(_OURS) and not name.startswith(_NOT_OURS) else None
