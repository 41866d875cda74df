"""Layering: what Triton loads imports neither the launcher nor the client; the launcher not the client.

Why a test: ``backend/`` (and the ``model.py`` files of ``model_repository/``) is exactly what
runs inside the Triton stubs. An import of ``launcher`` there drags the operator's side into
every stub, and an import of ``client`` makes the server depend on its own client (one
convenient line did that once: ``--demo`` imported ``client.cli``). The sources are parsed,
not imported, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Top-level folder -> top-level packages its sources must not import.
FORBIDDEN = {
    "backend": ("launcher", "client"),
    "model_repository": ("launcher", "client"),
    "launcher": ("client",),
}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names that ``path`` imports anywhere (module level or in a function).

    Relative imports are left out: they stay inside the file's own package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("folder", "forbidden"), sorted(FORBIDDEN.items()))
def test_no_import_across_layers(folder: str, forbidden: tuple[str, ...]) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python sources under {folder}/"
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if name.split(".")[0] in forbidden
    ]
    assert not bad, f"{folder}/ must not import {', '.join(forbidden)}:\n" + "\n".join(bad)


def test_checker_sees_imports_in_functions(tmp_path: Path) -> None:
    """The check above is only as good as this: a lazy import inside a function is found."""
    src = tmp_path / "m.py"
    src.write_text(
        "import os.path\nfrom . import sibling\n\n"
        "def f():\n    from client.cli import main\n    import launcher.serve\n",
        encoding="utf-8",
    )
    assert imported_modules(src) == {"os.path", "client.cli", "launcher.serve"}
