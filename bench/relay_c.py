"""The floor of a call with its frames carried in C, for bench/capacity.py (``relay-c``): bench/relay_floor.py's
relay (``relay-picows``), the same set-up in Python (webhook, hand-off, token, Savants connect and confirmation,
closes), with both listeners compiled from bench/relay_floor_c.pyx. What it costs against ``relay-picows`` is
what moving the bridge's per-frame path to C could save (issue 10).

The extension is built on first use, with ``-O3`` as setup.py builds the kernels, into a cache outside the
source tree (``$XDG_CACHE_HOME/telephony-bridge/relay-c``, one build per source, interpreter and picows
version). It needs Cython 3, setuptools, a C compiler and Python's headers; without one of them it says which.

    .venv/bin/pip install cython
    .venv/bin/python bench/relay_floor_c_check.py     # build, and check its bytes against the Python path's
    PORT=8090 SAVANTS_BASE_URL=http://127.0.0.1:8081 SAVANTS_API_KEY=k SAVANTS_DEVICE_IDS=a,b \\
        .venv/bin/python bench/relay_c.py
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picows import WSListener
from relay_floor import CallSetup, Relay, SavantsLeg, serve  # bench/, beside this script

from telephony_bridge.audio import codec, resample

BENCH = Path(__file__).resolve().parent
SOURCE = BENCH / "relay_floor_c.pyx"
KERNELS = BENCH.parent / "telephony_bridge" / "audio"  # _kernels.h: the bridge's filters, which the relay runs
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "telephony-bridge" / "relay-c"
MODULE = "relay_floor_c"


class BuildError(Exception):
    """The extension could not be built: what is missing, or the compiler's last words."""


def build() -> Path:
    """The compiled relay_floor_c.pyx for this interpreter: from the cache, or built into it now."""
    target = _cached()
    if target.exists():
        return target
    missing = _missing_tool()
    if missing is not None:
        raise BuildError(missing)
    from Cython.Build import cythonize
    from Cython.Compiler.Errors import CompileError as CythonError
    from setuptools import Distribution, Extension
    from setuptools.errors import BaseError, CCompilerError

    with tempfile.TemporaryDirectory(prefix="relay-c-") as folder:
        work = Path(folder)
        shutil.copy(SOURCE, work / SOURCE.name)  # Cython writes its C beside the source: not in the tree
        extension = Extension(
            MODULE, [str(work / SOURCE.name)], include_dirs=[str(KERNELS)], extra_compile_args=["-O3"]
        )
        log = io.StringIO()  # Cython's and setuptools' chatter; the compiler's own goes to stderr as it comes
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                modules = cythonize([extension], quiet=True)
                command = Distribution({"name": MODULE, "ext_modules": modules}).get_command_obj("build_ext")
                command.build_lib, command.build_temp = str(work / "lib"), str(work / "temp")
                command.ensure_finalized()
                command.run()
        except (CythonError, BaseError, CCompilerError) as exc:
            raise BuildError(f"building {SOURCE.name} failed: {exc}\n{log.getvalue()[-3000:]}") from exc
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.copy(command.get_ext_fullpath(MODULE), staged)
        os.replace(staged, target)  # whole or not at all, should two builds race
    return target


def load() -> ModuleType:
    """The extension (built if need be), configured with the bridge's taps and μ-law tables, as kernels.py
    configures telephony_bridge.audio._kernels (the upsampler's taps doubled: its gain of 2)."""
    path = build()
    spec = importlib.util.spec_from_file_location(MODULE, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tables = (2.0 * resample.SINC_TAPS, resample.SINC_TAPS, codec.ULAW_DECODE, codec.ULAW_ENCODE)
    module.configure(*(table.tobytes() for table in tables))
    return module


def load_or_explain(program: str) -> ModuleType | None:
    """``load()``, or None once the reason is on stderr (after ``program``'s name)."""
    try:
        return load()
    except BuildError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return None


def _cached() -> Path:
    """Where the build of this source for this interpreter and picows (whose .pxd it compiles against) is kept."""
    key = hashlib.sha256()
    for source in (SOURCE, KERNELS / "_kernels.h"):
        key.update(source.read_bytes())
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    key.update(repr([sys.version, sys.executable, suffix, importlib.metadata.version("picows")]).encode())
    return CACHE / key.hexdigest()[:16] / f"{MODULE}{suffix}"


def _missing_tool() -> str | None:
    """What building needs and this environment lacks, in a sentence; None if nothing."""
    try:
        cython = importlib.metadata.version("cython")
    except importlib.metadata.PackageNotFoundError:
        return f"relay-c needs Cython 3 to build {SOURCE.name}: {sys.executable} -m pip install cython"
    if int(cython.split(".")[0]) < 3:
        return f"relay-c needs Cython 3 to build {SOURCE.name}, not {cython}: {sys.executable} -m pip install -U cython"
    if importlib.util.find_spec("setuptools") is None:
        return f"relay-c needs setuptools to build {SOURCE.name}: {sys.executable} -m pip install setuptools"
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None:
        return f"relay-c needs a C compiler to build {SOURCE.name}: {compiler!r} is not on PATH (Debian: gcc)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"relay-c needs Python's headers to build {SOURCE.name}: no {headers} (Debian: python3-dev)"
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
