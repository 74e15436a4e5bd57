"""A bind on ``::`` where ``net.ipv6.bindv6only`` is 1 takes IPv6 alone: start-up says so, for each listener.

``telephony-bridge serve --dev`` runs in a network namespace of its own (``unshare -n``; the sysctl is per
namespace, so the machine's own is untouched), with its loopback up and the sysctl set there, and the test reads
its start-up lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

# Bring the namespace's loopback up (SIOCGIFFLAGS, SIOCSIFFLAGS | IFF_UP: no iproute2 needed), set the sysctl,
# then become the bridge.
CHILD = textwrap.dedent(
    """
    import fcntl, os, socket, struct, sys
    with socket.socket() as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
    with open("/proc/sys/net/ipv6/bindv6only", "w") as f:
        f.write(sys.argv[1])
    os.execv(sys.executable, [sys.executable, "-m", "telephony_bridge", "serve", "--dev"])
    """
)


def unshare() -> list[str]:
    """How to enter a network namespace of our own; without one, skip here but fail under CI."""
    command = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    try:
        ok = Path("/proc/sys/net/ipv6").is_dir() and subprocess.run([*command, "true"], timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI must test the IPv6-only warning: {' '.join(command)} (or IPv6) is not available")
        pytest.skip(f"no network namespace of our own here ({' '.join(command)}), or no IPv6")
    return command


def startup_lines(bindv6only: str) -> list[dict[str, str]]:
    """The bridge's log lines up to the SIP listener's, on ``::`` in a namespace with this ``bindv6only``."""
    env = {
        **os.environ,
        "BRIDGE__SERVER__HOST": "::",
        "BRIDGE__SERVER__PORT": "0",
        "BRIDGE__SIP__PORT": "0",
        "BRIDGE__SIP__RTP_PORTS": "40000-40009",
    }
    process = subprocess.Popen(
        [*unshare(), sys.executable, "-c", CHILD, bindv6only], env=env, stderr=subprocess.PIPE, text=True
    )
    lines: list[dict[str, str]] = []
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = process.stderr.readline()
            if not text:
                break
            lines.append(orjson.loads(text) if text.startswith("{") else {"msg": text.strip()})
            sip_up = any("SIP ingress listening" in line["msg"] for line in lines)
            if sip_up and lines[-1]["msg"] == "Application startup complete.":
                break  # the bridge's start-up is over: its warnings are all out
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    lines += [orjson.loads(t) for t in rest.splitlines() if t.startswith("{")]
    assert any("SIP ingress listening" in line["msg"] for line in lines), lines
    return lines


@pytest.mark.parametrize("bindv6only", ["1", "0"])
def test_a_bind_on_the_ipv6_wildcard_says_when_it_takes_ipv6_alone(bindv6only: str) -> None:
    lines = startup_lines(bindv6only)
    assert any(line["msg"].startswith("bridge listening on [::]:") for line in lines), lines  # as a URL writes it
    warnings = [line["msg"] for line in lines if "takes IPv6 only" in line["msg"]]
    if bindv6only == "1":
        assert len(warnings) == 2, lines
        assert warnings[0].startswith("listening on [::]:") and "set server.host to 0.0.0.0" in warnings[0]
        assert warnings[1].startswith("SIP ingress on [::]:") and "set sip.host to 0.0.0.0" in warnings[1]
    else:
        assert warnings == []
