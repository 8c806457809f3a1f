"""Dependencies point one way (DESIGN.md "Layout"): ``gateway`` uses ``firmware_bridge``
and ``cloud_sync``; those two never import ``gateway`` nor each other, and their tests
do not need ``gateway`` either. No shipped module imports the harness (``devtools``) when
it is loaded: a store box has none.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> top-level packages its modules must never import
FORBIDDEN = {
    "firmware_bridge": {"gateway", "cloud_sync", "devtools", "tests"},
    "cloud_sync": {"gateway", "firmware_bridge", "devtools", "tests"},
    "tests/firmware_bridge": {"gateway"},
    "tests/cloud_sync": {"gateway"},
}
SHIPPED = ("gateway", "firmware_bridge", "cloud_sync")


def _imports(tree: ast.AST, *, module_level_only: bool = False) -> Iterator[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``tree``."""
    nodes = ast.iter_child_nodes(tree) if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]
        elif module_level_only and isinstance(node, ast.If | ast.Try):
            # `if TYPE_CHECKING:` / `try: import x` blocks still run at import time.
            yield from _imports(node, module_level_only=True)


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_lower_packages_and_their_tests_never_import_what_is_above_them(folder: str) -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {package}"
        for path in _sources(folder)
        for line, package in _imports(ast.parse(path.read_text(), str(path)))
        if package in FORBIDDEN[folder]
    ]
    assert found == []


@pytest.mark.parametrize("package", SHIPPED)
def test_no_shipped_module_loads_the_harness(package: str) -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {top}"
        for path in _sources(package)
        for line, top in _imports(ast.parse(path.read_text(), str(path)), module_level_only=True)
        if top in ("devtools", "tests")
    ]
    assert found == []
