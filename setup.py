"""The optional C extension; everything else about the package is in pyproject.toml.

``optional=True``: where no C compiler (or no Python headers) is at hand the install still succeeds and the
bridge runs its numpy path (``telephony_bridge/audio/kernels.py`` says which one it runs, and why).

``-O3`` (as GCC and Clang spell it; not on Windows, where MSVC would not take it): the compiler otherwise takes
the interpreter's own flags, which differ by build (pyenv's ``-O3``, Debian's ``-O2``), and GCC 12 vectorises
the filters' loops only at ``-O3``: the kernels then cost half as much again (``bench/frame_path.py``,
"conversion alone"). The last ``-O`` given wins.
"""

import sys

from setuptools import Extension, setup

OPTIMISE = [] if sys.platform == "win32" else ["-O3"]

setup(
    ext_modules=[
        Extension(
            "telephony_bridge.audio._kernels",
            ["telephony_bridge/audio/_kernels.c"],
            depends=["telephony_bridge/audio/_kernels.h"],  # the code it includes: a change rebuilds it
            extra_compile_args=OPTIMISE,
            optional=True,
        ),
    ]
)
