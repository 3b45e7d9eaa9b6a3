"""Every public class, function and method of the installed package says what it does.

House rule: a public name in ``pyflanneld/`` has a docstring (what it takes and returns, units,
what it raises, the upstream source it mirrors). Read with :mod:`ast` (nothing imported, no root).
Public: a module-level or class-level ``def``/``class`` whose name does not start with ``_``, in a
public class. A method that overrides a documented method of a pyflanneld base class (a backend's
``register``, ``start`` …) carries that method's contract and needs no docstring of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pyflanneld"

Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _classes(trees: dict[Path, ast.Module]) -> dict[str, ast.ClassDef]:
    """Every class of the package by its name (a base is found by the name it is imported as)."""
    out: dict[str, ast.ClassDef] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, node)
    return out


def _base_names(cls: ast.ClassDef) -> list[str]:
    names = []
    for b in cls.bases:
        if isinstance(b, ast.Name):
            names.append(b.id)
        elif isinstance(b, ast.Attribute):
            names.append(b.attr)
        elif isinstance(b, ast.Subscript) and isinstance(b.value, ast.Name):
            names.append(b.value.id)
    return names


def _documented_in_bases(cls: ast.ClassDef, name: str, classes: dict[str, ast.ClassDef],
                         seen: set[str] | None = None) -> bool:
    seen = set() if seen is None else seen
    for base_name in _base_names(cls):
        base = classes.get(base_name)
        if base is None or base_name in seen:
            continue
        seen.add(base_name)
        for node in base.body:
            if isinstance(node, Def) and node.name == name and ast.get_docstring(node):
                return True
        if _documented_in_bases(base, name, classes, seen):
            return True
    return False


def missing_docstrings(root: Path = PACKAGE) -> list[str]:
    """``path:line: name`` of every public def/class under ``root`` without a docstring."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}
    classes = _classes(trees)
    out: list[str] = []

    def visit(body: list[ast.stmt], path: Path, owner: ast.ClassDef | None) -> None:
        for node in body:
            if not isinstance(node, Def) or node.name.startswith("_"):
                continue
            if ast.get_docstring(node) is None and not (
                    owner is not None and _documented_in_bases(owner, node.name, classes)):
                where = f"{owner.name}.{node.name}" if owner is not None else node.name
                out.append(f"{path.relative_to(root.parent)}:{node.lineno}: {where}")
            if isinstance(node, ast.ClassDef):
                visit(node.body, path, node)

    for path, tree in trees.items():
        visit(tree.body, path, None)
    return out


def test_every_public_name_in_the_package_has_a_docstring() -> None:
    missing = missing_docstrings()
    assert not missing, "public names without a docstring (say what it takes, returns, raises):\n" + \
        "\n".join(missing)


def test_the_check_finds_a_missing_docstring(tmp_path: Path) -> None:
    """The check can fail: an undocumented function, class and method are each reported; private
    names and documented overrides are not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        'def f():\n    pass\n\n'
        'def _private():\n    pass\n\n'
        'class Base:\n    """doc"""\n    def run(self):\n        """doc"""\n\n'
        'class C(Base):\n    def run(self):\n        pass\n    def other(self):\n        pass\n\n'
        'class D:\n    pass\n')
    assert missing_docstrings(pkg) == ["pkg/m.py:1: f", "pkg/m.py:12: C", "pkg/m.py:15: C.other", "pkg/m.py:18: D"]
