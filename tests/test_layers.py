"""The package's folders are its layers, and imports only go down them.

core ← attacks ← methods ← words ← scale ← hf ← app: a module may import its own layer and the
layers to its left, never one to its right, and no chain of imports comes back to where it
started, inside a layer either. The core is pure algorithm; the application (command line,
data, checkpoints) sits on top of everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import advfunc

ROOT = Path(advfunc.__file__).parent
LAYERS = ["core", "attacks", "methods", "words", "scale", "hf", "app"]


def _layer(module: str) -> str | None:
    """The layer of a dotted module name inside advfunc (None for the package's own front files)."""
    parts = module.split(".")
    if parts[0] != "advfunc" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _imports(path: Path, modules: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """The advfunc modules ``path`` imports (``from package import module`` counts the module when it is one)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            for alias in node.names:
                if node.module == "advfunc" or f"{node.module}.{alias.name}" in modules:
                    found.append(f"{node.module}.{alias.name}")
    return [name for name in found if name.startswith("advfunc")]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(paths: list[Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports, each import resolved to the deepest module it names."""
    names = {_module_name(path): path for path in paths}
    graph = {}
    for name, path in names.items():
        targets = set()
        for imported in _imports(path, set(names)):
            while imported not in names and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in names and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = {t for t in targets if t != "advfunc"}  # the front file re-exports, nothing imports it back
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle for each strongly connected group of modules that import each other (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_only_go_down_the_layers():
    violations = []
    checked = 0
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT.parent).with_suffix("")
        own = _layer(".".join(relative.parts))
        if own is None:
            continue
        checked += 1
        for name in _imports(path):
            other = _layer(name)
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                violations.append(f"{relative} ({own}) imports {name} ({other})")
    assert checked > 30, "the walk should see every module of the package"
    assert not violations, "\n".join(violations)


def test_every_module_lives_in_a_layer():
    loose = [p.name for p in ROOT.glob("*.py") if p.stem not in ("__init__", "__main__", "hf")]
    assert not loose, f"modules outside the layer folders: {loose}"


def test_the_check_sees_a_violation(tmp_path):
    """The walker is not blind: an upward import in a fake core module is reported."""
    fake = tmp_path / "mod.py"
    fake.write_text("from advfunc.app import cli\nimport advfunc.methods.pgd\n")
    assert [_layer(n) for n in _imports(fake)] == ["app", "methods"]


def test_no_module_imports_itself_through_others():
    """No cycle anywhere, inside a layer too: a module's imports never lead back to it."""
    graph = _graph(sorted(ROOT.rglob("*.py")))
    assert len(graph) > 30
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_check_sees_a_cycle(tmp_path):
    """The cycle finder is not blind: two modules that import each other, and a loop of three, are found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []
