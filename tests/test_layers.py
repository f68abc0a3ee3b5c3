"""The folders are the architecture: ``core/`` imports nothing outside itself and does no I/O;
``adapters/`` import no actor, CLI or control plane (STYLE.md 1, 9)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pydstack"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("adapters"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_adapters_import_no_actor_cli_or_control_plane(path: Path) -> None:
    banned = ("pydstack.actors", "pydstack.cli", "pydstack.controlplane")
    bad = sorted(m for m in _imports(path) if m.startswith(banned))
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


@pytest.mark.parametrize("path", _modules("core"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_imports_only_core_and_pure_libraries(path: Path) -> None:
    io = ("asyncio", "socket", "subprocess", "nats", "aiohttp", "structlog", "os", "shutil")
    bad = sorted(
        m
        for m in _imports(path)
        if (m.startswith("pydstack.") and not m.startswith("pydstack.core")) or m in io
    )
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
