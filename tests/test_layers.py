"""The package's folders are its layers, and imports only go down them.

core ← attacks ← methods ← scale ← hf ← app: a module may import its own layer and the
layers to its left, never one to its right. The core is pure algorithm; the
application (command line, data, checkpoints) sits on top of everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import advfunc

ROOT = Path(advfunc.__file__).parent
LAYERS = ["core", "attacks", "methods", "scale", "hf", "app"]


def _layer(module: str) -> str | None:
    """The layer of a dotted module name inside advfunc (None for the package's own front files)."""
    parts = module.split(".")
    if parts[0] != "advfunc" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names if node.module == "advfunc")
    return [name for name in found if name.startswith("advfunc")]


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
