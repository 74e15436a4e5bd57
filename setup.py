"""The optional C extension; everything else about the package is in pyproject.toml.

``optional=True``: where no C compiler (or no Python headers) is at hand the install still succeeds and the
bridge runs its numpy path (``telephony_bridge/audio/kernels.py`` says which one it runs, and why).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("telephony_bridge.audio._kernels", ["telephony_bridge/audio/_kernels.c"], optional=True),
    ]
)
