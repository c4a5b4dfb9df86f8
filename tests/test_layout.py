"""Dependencies run one way: training/ and inference/ import model/, never each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path, package: str, root: Path = REPO) -> set[str]:
    """Every module ``path`` (under ``root/<package>``) imports, relative ones resolved."""
    here = ["calcinosis", package, *path.relative_to(root / package).parent.parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: max(0, len(here) - (node.level - 1))]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                names.add(node.module or "")
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("model", ("calcinosis.training", "calcinosis.inference")),
        ("inference", ("calcinosis.training",)),
        ("training", ("calcinosis.inference",)),
    ],
)
def test_no_package_imports_what_it_must_not(package, forbidden):
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name in sorted(_imported_modules(path, package))
        if name.startswith(forbidden)
    ]
    assert not offenders, offenders


def test_inference_does_not_even_name_training():
    """The issue's own check: ``grep -rn calcinosis.training inference/`` finds nothing."""
    hits = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "inference").rglob("*.py"))
        if "calcinosis.training" in p.read_text(encoding="utf-8")
    ]
    assert not hits, hits


def test_relative_imports_are_resolved_for_the_check(tmp_path):
    (tmp_path / "inference" / "sub").mkdir(parents=True)
    f = tmp_path / "inference" / "x.py"
    f.write_text("from ..training import data\nfrom .tiling import tile_grid\nimport numpy\n")
    assert _imported_modules(f, "inference", tmp_path) == {
        "calcinosis.training",
        "calcinosis.inference.tiling",
        "numpy",
    }
    deep = tmp_path / "inference" / "sub" / "y.py"
    deep.write_text("from ...training.data import read_manifest\nfrom . import z\n")
    assert _imported_modules(deep, "inference", tmp_path) == {
        "calcinosis.training.data",
        "calcinosis.inference.sub",
    }


def test_every_package_directory_is_listed_for_the_wheel():
    """pyproject lists packages explicitly: a sub-package left out ships nowhere."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(["calcinosis", *init.parent.relative_to(REPO).parts])
        for top in ("model", "training", "inference")
        for init in (REPO / top).rglob("__init__.py")
        if "static" not in init.parts and "node_modules" not in init.parts
    }
    assert found == listed, {
        "missing from pyproject": sorted(found - listed),
        "stale": sorted(listed - found),
    }
