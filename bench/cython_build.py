"""Building a bench/ Cython source into an importable module, on first use, into a cache outside the source tree
(``$XDG_CACHE_HOME/telephony-bridge/<name>``, one build per source, interpreter and picows version, whose .pxd
the sources compile against), with ``-O3`` as setup.py builds the kernels. It needs Cython 3, setuptools, a C
compiler and Python's headers; without one of them ``BuildError`` says which, and how to get it.

Used by bench/relay_c.py (``relay_floor_c.pyx``), bench/lean_callers.py (``lean_callers_c.pyx``) and
bench/lean_ai.py (``lean_ai_c.pyx``).
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

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "telephony-bridge"


class BuildError(Exception):
    """The extension could not be built: what is missing, or the compiler's last words."""


def build(source: Path, include_dirs: tuple[Path, ...] = (), also_key: tuple[Path, ...] = ()) -> Path:
    """The compiled ``source`` (module named for its stem) for this interpreter: from the cache, or built into it
    now. ``include_dirs``: C headers it includes; ``also_key``: files besides the source that a change to
    should rebuild it (those headers)."""
    module = source.stem
    target = _cached(source, also_key)
    if target.exists():
        return target
    missing = _missing_tool(source.name)
    if missing is not None:
        raise BuildError(missing)
    from Cython.Build import cythonize
    from Cython.Compiler.Errors import CompileError as CythonError
    from setuptools import Distribution, Extension
    from setuptools.errors import BaseError, CCompilerError

    with tempfile.TemporaryDirectory(prefix=f"{module}-") as folder:
        work = Path(folder)
        shutil.copy(source, work / source.name)  # Cython writes its C beside the source: not in the tree
        extension = Extension(
            module, [str(work / source.name)], include_dirs=[str(d) for d in include_dirs], extra_compile_args=["-O3"]
        )
        log = io.StringIO()  # Cython's and setuptools' chatter; the compiler's own goes to stderr as it comes
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                modules = cythonize([extension], quiet=True)
                command = Distribution({"name": module, "ext_modules": modules}).get_command_obj("build_ext")
                command.build_lib, command.build_temp = str(work / "lib"), str(work / "temp")
                command.ensure_finalized()
                command.run()
        except (CythonError, BaseError, CCompilerError) as exc:
            raise BuildError(f"building {source.name} failed: {exc}\n{log.getvalue()[-3000:]}") from exc
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.copy(command.get_ext_fullpath(module), staged)
        os.replace(staged, target)  # whole or not at all, should two builds race
    return target


def load(source: Path, include_dirs: tuple[Path, ...] = (), also_key: tuple[Path, ...] = ()) -> ModuleType:
    """``build()``'s module, imported (once a process: a second call returns the same module)."""
    module = source.stem
    if module in sys.modules:
        return sys.modules[module]
    path = build(source, include_dirs, also_key)
    spec = importlib.util.spec_from_file_location(module, path)
    assert spec is not None and spec.loader is not None, path
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[module]
        raise
    return loaded


def _cached(source: Path, also_key: tuple[Path, ...]) -> Path:
    """Where the build of this source for this interpreter and picows is kept."""
    key = hashlib.sha256()
    for path in (source, *also_key):
        key.update(path.read_bytes())
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    key.update(repr([sys.version, sys.executable, suffix, importlib.metadata.version("picows")]).encode())
    return CACHE / source.stem / key.hexdigest()[:16] / f"{source.stem}{suffix}"


def _missing_tool(name: str) -> str | None:
    """What building ``name`` needs and this environment lacks, in a sentence; None if nothing."""
    try:
        cython = importlib.metadata.version("cython")
    except importlib.metadata.PackageNotFoundError:
        return f"building {name} needs Cython 3: {sys.executable} -m pip install cython"
    if int(cython.split(".")[0]) < 3:
        return f"building {name} needs Cython 3, not {cython}: {sys.executable} -m pip install -U cython"
    if importlib.util.find_spec("setuptools") is None:
        return f"building {name} needs setuptools: {sys.executable} -m pip install setuptools"
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None:
        return f"building {name} needs a C compiler: {compiler!r} is not on PATH (Debian: gcc)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"building {name} needs Python's headers: no {headers} (Debian: python3-dev)"
    return None
