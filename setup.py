"""The optional C extensions; everything else about the package is in pyproject.toml.

- ``audio/_kernels.c``: the per-frame audio conversions (``audio/kernels.py``);
- ``_caller_path.c``: the caller's frame through the call core, on the kernels (``inbound.Inbound.audio_handler``);
- ``_taps.c``: Twilio's media message and the AI's audio frame read and handed over (``twilio.leg.TwilioLeg``,
  ``savants.client.SavantsConnection``);
- ``_ai_path.c``: the AI's frame through ``Outbound`` to the caller's leg, on the kernels (``Outbound.audio_handler``).

``optional=True``: where no C compiler (or no Python headers) is at hand the install still succeeds and the
bridge runs its Python and numpy path (``telephony_bridge/audio/kernels.py`` says which one it runs, and why).

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
            # the code it includes: a change rebuilds it
            depends=["telephony_bridge/audio/_kernels.h", "telephony_bridge/audio/_kernels_capi.h"],
            extra_compile_args=OPTIMISE,
            optional=True,
        ),
        Extension(
            "telephony_bridge._caller_path",
            ["telephony_bridge/_caller_path.c"],
            depends=["telephony_bridge/audio/_kernels_capi.h", "telephony_bridge/_pyattrs.h"],
            extra_compile_args=OPTIMISE,
            optional=True,
        ),
        Extension(
            "telephony_bridge._taps",
            ["telephony_bridge/_taps.c"],
            depends=["telephony_bridge/_pyattrs.h"],
            extra_compile_args=OPTIMISE,
            optional=True,
        ),
        Extension(
            "telephony_bridge._ai_path",
            ["telephony_bridge/_ai_path.c"],
            depends=["telephony_bridge/audio/_kernels_capi.h", "telephony_bridge/_pyattrs.h"],
            extra_compile_args=OPTIMISE,
            optional=True,
        ),
    ]
)
