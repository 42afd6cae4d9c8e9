"""Layering: the plugin imports no aiohttp and no server code, only the shared defence math."""

from __future__ import annotations

import ast
from pathlib import Path

import guard_server.vllm_plugin

PLUGIN_DIR = Path(guard_server.vllm_plugin.__file__).parent
ALLOWED_GUARD_MODULES = {"guard_server.defences.hashing"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_plugin_modules_import_no_server_code_and_no_aiohttp() -> None:
    sources = sorted(PLUGIN_DIR.glob("*.py"))
    assert sources
    for path in sources:
        for name in _imports(path):
            assert not name.startswith("aiohttp"), f"{path.name} imports {name}"
            if name.startswith("guard_server") and not name.startswith("guard_server.vllm_plugin"):
                assert name in ALLOWED_GUARD_MODULES, f"{path.name} imports {name}"
