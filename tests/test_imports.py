"""The shape of the code: no import circle among hsmfs modules, and the entry points that must stay
light (mount.hsmfs, the filler, the supervisor) never load typer or rich.

Imports are read with ast, not run: every ``import`` and ``from ... import`` of an hsmfs module
counts, at module level or inside a function (a lazy import only hides a circle), except those
under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hsmfs"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _resolve(name: str) -> Optional[str]:
    """The hsmfs module an imported name is (or is in)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # "from hsmfs.filler import faults": the submodule, if it is one, else the package
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for n in names:
            target = _resolve(n) if n.split(".")[0] == "hsmfs" else None
            if target is not None and target != module:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(m: str) -> Optional[list[str]]:
        color[m] = GREY
        stack.append(m)
        for n in sorted(graph[m]):
            if color[n] == GREY:
                return stack[stack.index(n):] + [n]
            if color[n] == WHITE:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        color[m] = BLACK
        return None

    for m in sorted(graph):
        if color[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def test_the_walk_sees_imports() -> None:
    """The checker itself: it must see cli's import of mounting and mounting's of errors."""
    assert "hsmfs.mounting" in imports_of("hsmfs.cli")
    assert "hsmfs.errors" in imports_of("hsmfs.mounting")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle() -> None:
    graph = {m: imports_of(m) for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_library_module_imports_an_entry_point() -> None:
    """Shared code lives in library modules: nothing imports cli or a __main__ module, and only the
    entry points start processes' main()s (hsmfs.filler.__main__ dispatches to hsmfs.systemd)."""
    for m in MODULES:
        for n in imports_of(m):
            assert n != "hsmfs.cli" or m == "hsmfs.__main__", f"{m} imports hsmfs.cli"
            assert not n.endswith("__main__"), f"{m} imports {n}"
            assert n != "hsmfs.daemon", f"{m} imports hsmfs.daemon, a process (its shared code is in hsmfs.session)"


@pytest.mark.parametrize("module", ["hsmfs.mounthelper", "hsmfs.daemon", "hsmfs.filler.__main__", "hsmfs.systemd"])
def test_light_entry_points_never_load_typer_or_rich(module: str) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    heavy = [line for line in r.stderr.splitlines() if line.split("|")[-1].strip().split(".")[0] in
             ("typer", "rich", "click")]
    assert not heavy, f"import {module} loads:\n" + "\n".join(heavy)
