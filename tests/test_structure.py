"""The shape of the package: no module reaches into another's private names, and no module grows past 500
lines (kernels/ aside). A plain AST walk over midistral/, no linter needed.

Private (one leading underscore, not a dunder): `x._name` where x is not self/cls and `_name` is not
defined in the same module but in another module of midistral, and `from m import _name` from another
module. Private names of other libraries (torch's `module._buffers`, `torch.ops.mkldnn._linear_pointwise`)
are those libraries' business: the package uses a few on purpose. A namedtuple's own API (`_replace`,
`_asdict`, `_fields`, `_make`) is public despite its underscore.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "midistral"
MAX_LINES = 500
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}

TOO_LONG_FOR_NOW: set[str] = set()
REACHES_IN_FOR_NOW: set[str] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _defined_here(tree: ast.AST) -> set[str]:
    """Names a module defines itself: functions, classes, assigned names and attributes, parameters."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
    for node in ast.walk(tree):  # __slots__ = ("_a", "_b") defines attributes too
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
            names |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return names


def package_names() -> dict[str, set[str]]:
    """The names each module of midistral defines (by path relative to the package)."""
    return {_rel(p): _defined_here(ast.parse(p.read_text(), str(p))) for p in _modules()}


def private_reach_ins(source: str, name: str, elsewhere: set[str]) -> list[str]:
    """`name:line: what` for every private name of another module (one that defines a name in `elsewhere`)
    the module `source` uses."""
    tree = ast.parse(source, name)
    own = _defined_here(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in NAMEDTUPLE_API:
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr not in own and node.attr in elsewhere:
                found.append(f"{name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [f"{name}:{node.lineno}: from {node.module} import {a.name}"
                      for a in node.names if _private(a.name)]
    return found


def test_no_private_reach_ins_across_modules():
    names = package_names()
    offences = []
    for path in _modules():
        rel = _rel(path)
        if rel not in REACHES_IN_FOR_NOW:
            elsewhere = set().union(*(n for m, n in names.items() if m != rel))
            offences += private_reach_ins(path.read_text(), rel, elsewhere)
    assert offences == [], "private names of other modules used:\n" + "\n".join(offences)


def test_no_module_over_500_lines():
    long = [f"{_rel(p)}: {n} lines" for p in _modules()
            if "kernels" not in p.relative_to(PACKAGE).parts and _rel(p) not in TOO_LONG_FOR_NOW
            and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert long == [], f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("source, offences", [
    ("import m\nm._hidden()\n", ["._hidden"]),
    ("import torch\ntorch._private_op()\n", []),
    ("class A:\n    def f(self):\n        return self._x, other._x\n", ["._x"]),
    ("def _helper(): pass\nx = thing._helper\n", []),
    ("from m import _secret, public\n", ["import _secret"]),
    ("p = point._replace(x=1)\ns = obj.__class__\n", []),
])
def test_the_rule_itself(source, offences):
    found = private_reach_ins(source, "probe.py", {"_hidden", "_x", "_helper"})
    assert len(found) == len(offences) and all(o in f for o, f in zip(offences, found)), found
