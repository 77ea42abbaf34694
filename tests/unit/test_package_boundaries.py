"""What ships and who may import whom.

The product is `shared/`, `services/` and the `clave` command (`clave/`). The development
workbench (`tools/`: portal stand-in, demo, bench, test data) is not packaged, so nothing
that ships may import it, and a service imports neither the command nor the workbench.
"""

from __future__ import annotations

import ast
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level packages it must never import
FORBIDDEN = {
    "services": {"clave", "tools", "tests"},
    "shared": {"clave", "services", "tools", "tests"},
    "clave": {"tools", "tests"},
}


def imported_top_levels(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file, wherever it is (also
    inside functions: a lazy import ships just the same)."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_across_the_boundary(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {top}"
        for path in files
        for line, top in sorted(imported_top_levels(path))
        if top in FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_and_dotted_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        "import os\nfrom . import x\ndef f():\n    from tools.portal import Portal\n    import clave.cli as c\n",
        encoding="utf-8",
    )
    assert {top for _, top in imported_top_levels(sample)} == {"os", "tools", "clave"}


def test_the_package_ships_the_product_only() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    # setuptools' find: top-level packages (a folder with __init__.py) matching a pattern
    packages = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()}
    shipped = {p for p in packages if any(fnmatchcase(p, pattern) for pattern in include)}
    assert "tools" in packages  # the workbench is a package, importable from the checkout
    assert shipped == {"shared", "services", "clave"}, sorted(shipped)


def test_the_local_stack_parts_are_development_dependencies() -> None:
    """SecantusDB (the local store) and aiosmtpd (the mail catcher) pull in numpy and
    shapely: a production install (`pip install .`) must not."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {d.split("==")[0].split("[")[0].lower() for d in project["dependencies"]}
    dev = {d.split("==")[0].split("[")[0].lower() for d in project["optional-dependencies"]["dev"]}
    assert not runtime & {"secantusdb", "aiosmtpd"}
    assert {"secantusdb", "aiosmtpd"} <= dev
