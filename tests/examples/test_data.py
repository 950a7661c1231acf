"""The demo and every example run from a bare clone: the data they name is in
the repository, next to its licence and source."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def data_paths(recipe: Path) -> list[Path]:
    spec = yaml.safe_load(recipe.read_text())
    found = []
    for value in spec.values():
        if isinstance(value, dict):
            found += [(recipe.parent / v).resolve() for k, v in value.items() if k.lower().endswith("path") and v]
    return found


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.name)
def test_every_example_reads_data_inside_the_repository(recipe: Path) -> None:
    paths = data_paths(recipe)
    assert paths, f"{recipe.name} names no input file"
    for path in paths:
        assert path.is_relative_to(ROOT), f"{recipe.name} reads {path}, outside the repository"
        assert path.is_file(), f"{recipe.name} reads {path}, which does not exist"


def test_every_data_file_has_its_source_and_licence_documented() -> None:
    data = ROOT / "examples" / "data"
    readme = (data / "README.md").read_text()
    for path in data.iterdir():
        if path.is_file() and path.name != "README.md":
            assert f"`{path.name}`" in readme, f"{path.name} is not listed in examples/data/README.md"
    for licence in (data / "licenses").iterdir():
        assert f"licenses/{licence.name}" in readme


def test_the_demo_reads_no_data_outside_the_repository() -> None:
    assert "shared" not in (ROOT / "scripts" / "demo.sh").read_text()
