"""pyproject.toml's promises: the oldest Python it accepts is one its dependencies accept too."""

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def oldest_python() -> str:
    (floor,) = [spec.version for spec in SpecifierSet(PROJECT["project"]["requires-python"]) if spec.operator == ">="]
    return floor


def test_every_dependency_accepts_the_oldest_python():
    # transformers >= 5.21 requires Python >= 3.11, so requires-python >= 3.10 promised an install that fails on 3.10
    floor = oldest_python()
    for line in PROJECT["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        metadata = importlib.metadata.metadata(requirement.name)
        assert requirement.specifier.contains(metadata["Version"], prereleases=True), line
        needs = metadata.get("Requires-Python")
        assert needs is None or SpecifierSet(needs).contains(floor), (
            f"{requirement.name} {metadata['Version']} requires Python {needs}; requires-python allows {floor}"
        )


def test_ruff_targets_the_oldest_python():
    assert PROJECT["tool"]["ruff"]["target-version"] == "py" + "".join(oldest_python().split(".")[:2])


def test_the_package_declares_its_type_hints():
    # PEP 561: without py.typed in the wheel, type checkers ignore the package's annotations
    package = ROOT / "src" / "deeptalk_hf"
    assert (package / "py.typed").is_file()
    assert "py.typed" in PROJECT["tool"]["setuptools"]["package-data"]["deeptalk_hf"]
