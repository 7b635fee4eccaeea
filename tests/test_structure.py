"""The package's shape: no import circle among its modules, and modules of a readable
size (about 450 lines at most; the few engine modules still above it may only shrink)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lehnz_async"
MAX_LINES = 450
#: Modules not yet split, at most as long as they are now: they may only get shorter.
#: (Each is one class with one job; splitting them is open work, see docs/DESIGN.md.)
RATCHET: dict[str, int] = {}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_at_import_time(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports when it is imported: module-level
    imports, not those under ``if TYPE_CHECKING:`` or inside functions."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target in known:
                found.add(target)
            for alias in node.names:  # `from . import x` where x is a module
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
    found.discard(name)
    return found


def test_no_module_imports_itself_back_through_others() -> None:
    mods = modules()
    graph = {name: imports_at_import_time(name, path, set(mods)) for name, path in mods.items()}
    # a package importing its own submodules (to re-export them) is not a circle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_modules_stay_readable() -> None:
    too_long = {}
    for path in PACKAGE.rglob("*.py"):
        n = len(path.read_text().splitlines())
        cap = RATCHET.get(str(path.relative_to(PACKAGE)), MAX_LINES)
        if n > cap:
            too_long[str(path.relative_to(PACKAGE))] = (n, cap)
    assert not too_long, f"modules over their line cap (lines, cap): {too_long}"


def test_the_ratchet_names_only_modules_still_over_the_bar() -> None:
    """Once a module is split below the bar, it leaves the ratchet (and is held to it)."""
    for name in RATCHET:
        n = len((PACKAGE / name).read_text().splitlines())
        assert n > MAX_LINES, f"{name} has {n} lines: take it out of RATCHET"
