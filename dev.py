#!/usr/bin/env python3
"""One-step set-up and run: ``python3 dev.py serve`` or ``python3 dev.py test``.

On first use (and whenever pyproject.toml, constraints.txt or the C extension's source changes) it creates
``.venv`` beside this file and installs the package with its test extras into it, at the versions
constraints.txt pins (the ones CI and the Docker image use); where a C compiler is at hand that builds the
optional audio kernels too (telephony_bridge/audio/kernels.py). Then it becomes the bridge's CLI or pytest
inside that environment (``os.execv``: same process, so SIGTERM and Ctrl-C reach the bridge itself).
``serve`` runs with ``--dev``: with no SAVANTS_BASE_URL it uses the embedded Savants emulator, on 127.0.0.1
unless HOST is given. Needs nothing but Python 3.11 or newer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed-from"
CONSTRAINTS = ROOT / "constraints.txt"
# What the install depends on: a change to any of these reinstalls (and so rebuilds the C extension).
INSTALL_INPUTS = (
    ROOT / "pyproject.toml",
    CONSTRAINTS,
    ROOT / "setup.py",
    ROOT / "telephony_bridge/audio/_kernels.c",
    ROOT / "telephony_bridge/audio/_kernels.h",
    ROOT / "telephony_bridge/audio/_kernels_capi.h",
    ROOT / "telephony_bridge/_caller_path.c",
    ROOT / "telephony_bridge/_taps.c",
    ROOT / "telephony_bridge/_pyattrs.h",
    ROOT / "telephony_bridge/_ai_path.c",
)


def ensure_environment() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script is what tells an older Python so
        sys.exit(f"telephony-bridge needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    # A C compiler that appeared since (or went) changes what the install builds: that counts as a change too.
    compiler = b"cc" if shutil.which("cc") or shutil.which("gcc") else b"no cc"
    wanted = hashlib.sha256(b"".join(path.read_bytes() for path in INSTALL_INPUTS) + compiler).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"dev.py: creating {VENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing telephony-bridge and its test extras", file=sys.stderr)
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    pinned = ["--constraint", str(CONSTRAINTS)]
    subprocess.run([*pip, "install", *pinned, "pip"], check=True)
    subprocess.run([*pip, "install", *pinned, "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


def parallel(args: list[str]) -> list[str]:
    """pytest-xdist's workers for a test run, unless the arguments choose (``-n 0``: one process): one per core, up
    to four. Most tests wait on real sockets and real time rather than compute, so workers overlap their waits.
    Not more than the cores: many tests carry real-time calls and assert that the caller heard no hole, and with
    four workers on two cores one did hear one."""
    if any(a.startswith(("-n", "--numprocesses")) for a in args):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ["-n", str(min(4, cores))]  # the cores this process may run on, not all the machine has


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__.strip())
        print("\nAny other first word is passed to the CLI: python3 dev.py call --help")
        return 0
    ensure_environment()
    if argv[0] == "test":
        command = [str(BIN / "python"), "-m", "pytest", *parallel(argv[1:]), *argv[1:]]
        os.chdir(ROOT)  # pytest's rootdir, and test paths as the README gives them; the CLI keeps the caller's
    elif argv[0] == "serve":  # a developer's machine: dev mode is allowed (the bridge says so loudly)
        command = [str(BIN / "telephony-bridge"), "serve", "--dev", *argv[1:]]
    else:
        command = [str(BIN / "telephony-bridge"), *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "nt":  # Windows has no exec that keeps the process: wait for the child instead
        return subprocess.call(command)
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
