"""The floor of a call with its frames carried in C, for bench/capacity.py (``relay-c``): bench/relay_floor.py's
relay (``relay-picows``), the same set-up in Python (webhook, hand-off, token, Savants connect and confirmation,
closes), with both listeners compiled from bench/relay_floor_c.pyx. What it costs against ``relay-picows`` is
what moving the bridge's per-frame path to C could save (issue 10).

The extension is built on first use (bench/cython_build.py: into a cache outside the source tree, one build per
source, interpreter and picows version). It needs Cython 3, setuptools, a C compiler and Python's headers;
without one of them it says which.

    .venv/bin/pip install cython
    .venv/bin/python bench/relay_floor_c_check.py     # build, and check its bytes against the Python path's
    PORT=8090 SAVANTS_BASE_URL=http://127.0.0.1:8081 SAVANTS_API_KEY=k SAVANTS_DEVICE_IDS=a,b \\
        .venv/bin/python bench/relay_c.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cython_build  # bench/, beside this script
from picows import WSListener
from relay_floor import CallSetup, Relay, SavantsLeg, serve  # bench/, beside this script

from telephony_bridge.audio import codec, resample

BENCH = Path(__file__).resolve().parent
SOURCE = BENCH / "relay_floor_c.pyx"
KERNELS = BENCH.parent / "telephony_bridge" / "audio"  # _kernels.h: the bridge's filters, which the relay runs


def load() -> ModuleType:
    """The extension (built if need be: bench/cython_build.py), configured with the bridge's taps and μ-law tables,
    as kernels.py configures telephony_bridge.audio._kernels (the upsampler's taps doubled: its gain of 2)."""
    module = cython_build.load(SOURCE, include_dirs=(KERNELS,), also_key=(KERNELS / "_kernels.h",))
    tables = (2.0 * resample.SINC_TAPS, resample.SINC_TAPS, codec.ULAW_DECODE, codec.ULAW_ENCODE)
    module.configure(*(table.tobytes() for table in tables))
    return module


def load_or_explain(program: str) -> ModuleType | None:
    """``load()``, or None once the reason is on stderr (after ``program``'s name)."""
    try:
        return load()
    except cython_build.BuildError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return None


class CompiledCall(CallSetup):
    """A relay-c call: its compiled listeners (``listener``, the media stream's, and the Savants leg's) carry the
    audio; this, relay_floor's set-up, the rest."""

    def __init__(self, relay: Relay, extension: ModuleType) -> None:
        super().__init__(relay)
        self._extension = extension
        self.listener: Any = extension.CallerLeg(self)  # the media stream's listener
        self._ai: Any = None  # the Savants leg's listener, once connecting

    def _listener(self, leg: SavantsLeg) -> WSListener:
        self._ai = self._extension.SavantsLeg(leg)  # AI audio in C; the rest to ``leg``
        return self._ai

    def _join(self, joined: bool) -> None:
        leg = self._leg
        self.listener.upstream = leg.transport if joined and leg is not None else None
        if self._ai is not None:
            self._ai.downstream = self.twilio if joined else None


def main() -> int:
    extension = load_or_explain("relay_c")
    if extension is None:
        return 1
    serve(Relay(lambda relay: CompiledCall(relay, extension).listener))
    return 0


if __name__ == "__main__":
    sys.exit(main())
