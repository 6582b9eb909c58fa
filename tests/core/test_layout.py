"""The package layout's import rules (docs/runtime.md, "Where the code lives"), checked on
the source: every import counts, lazy and TYPE_CHECKING ones included, so a rule cannot be
dodged by moving an import into a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mstar

ROOT = Path(mstar.__file__).parent

#: folder -> folders it must never import
FORBIDDEN = {
    "model": {"engine", "runtime", "api_server", "serving"},
    "api_server": {"runtime", "engine", "serving"},
    "runtime": {"api_server", "serving"},
    "engine": {"runtime", "api_server", "serving"},
    "errors": {"api_server", "runtime", "engine", "serving", "model"},
    "events": {"api_server", "runtime", "engine", "serving", "model"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level mstar packages `path` imports (`mstar.x.y` -> "x")."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "mstar":
                continue
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("mstar.")}
    return found


def sources(folder: str) -> list[Path]:
    single = ROOT / f"{folder}.py"
    return [single] if single.exists() else sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_a_folder_never_imports_what_sits_above_it(folder: str) -> None:
    files = sources(folder)
    assert files, f"no sources for {folder}"
    bad = {f"{path.relative_to(ROOT)} imports mstar.{name}"
           for path in files for name in imported_packages(path) & FORBIDDEN[folder]}
    assert not bad, sorted(bad)


def test_the_moved_roles_are_gone_from_their_old_places() -> None:
    for old in ("runtime.py", "wiring.py", "worker", "conductor", "streaming",
                "api_server/frontend.py", "api_server/gateway.py"):
        assert not (ROOT / old).exists(), old


def test_plugins_written_against_the_old_name_of_done_still_import() -> None:
    from mstar.model import Done, Finished

    assert Finished is Done
