"""The pins agree with pyproject.toml: the lock satisfies every range, and the minimum file pins each lower bound
(.ci/run installs it in a venv of its own and runs tests against it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in requirements if r.marker is None or r.marker.evaluate()]


def pins(name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{name}: {line!r} is not an exact pin"
            out[canonicalize_name(requirement.name)] = spec.version
    return out


def test_pins_lock_satisfies_every_declared_range() -> None:
    lock = pins("constraints.txt")
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in lock, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={lock[name]}, outside {requirement.specifier}"
        )


def test_pins_minimum_file_pins_each_lower_bound() -> None:
    minimum = pins("constraints-minimum.txt")
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        (lower,) = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
        assert name in minimum, f"constraints-minimum.txt does not pin {requirement.name}"
        assert Version(minimum[name]) == Version(lower), (
            f"constraints-minimum.txt pins {requirement.name}=={minimum[name]}, but pyproject.toml's bound is {lower}"
        )
