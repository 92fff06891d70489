"""The three wings' rules (docs/architecture.md), read from the source's import statements.

- no import circles among fer_sweep's modules (local imports inside functions count too: a
  circle hidden in a function is still a circle a reader has to untangle);
- the core imports neither the sweep wing nor the tools, nor MLflow, Hydra or Optuna;
- the sweep wing imports no tool;
- a tool imports no ``_private`` name of the sweep wing.

The checker is a plain function of {module: source}, so the tests below also feed it a tree with
one rule broken and see it named.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fer_sweep"
CORE_FORBIDS = ("fer_sweep.sweep", "fer_sweep.tools", "mlflow", "hydra", "optuna")


def read_tree(root: Path = ROOT / PACKAGE) -> dict[str, str]:
    """{dotted module name: source} for every .py file under the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = path.read_text()
    return out


def imports(name: str, source: str, modules: Mapping[str, str]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import in ``source``; a
    ``from pkg import mod`` counts as importing ``pkg.mod`` when that is a module."""
    is_pkg = f"{name}.__init__" in modules or any(m.startswith(name + ".") for m in modules)
    pkg = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append(
                    (sub, "", node.lineno) if sub in modules else (base, a.name, node.lineno)
                )
    return found


def graph(modules: Mapping[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (itself left out)."""
    return {
        name: {m for m, _, _ in imports(name, src, modules) if m in modules and m != name}
        for name, src in modules.items()
    }


def circles(g: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def wing(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or name.endswith((".core", ".sweep", ".tools")) else ""


def violations(modules: Mapping[str, str]) -> list[str]:
    """Every broken rule, one line each (empty: the house stands)."""
    out = [f"import circle: {' <-> '.join(c)}" for c in circles(graph(modules))]
    for name, src in sorted(modules.items()):
        for target, attr, line in imports(name, src, modules):
            where = f"{name} (line {line}) imports {target}" + (f".{attr}" if attr else "")
            if wing(name) == "core" and target.startswith(CORE_FORBIDS):
                out.append(f"core -> outside the core: {where}")
            if wing(name) == "sweep" and target.startswith("fer_sweep.tools"):
                out.append(f"sweep -> tools: {where}")
            if wing(name) == "tools" and target.startswith("fer_sweep.sweep"):
                private = attr.startswith("_") or any(
                    p.startswith("_") and p != "__init__" for p in target.split(".")
                )
                if private:
                    out.append(f"tools -> a private name of the sweep wing: {where}")
    return out


def test_the_three_wings_hold():
    modules = read_tree()
    assert {"fer_sweep.core", "fer_sweep.sweep", "fer_sweep.tools"} <= set(modules)
    assert violations(modules) == []


def test_each_wing_states_its_rule():
    modules = read_tree()
    for w in ("core", "sweep", "tools"):
        doc = ast.get_docstring(ast.parse(modules[f"fer_sweep.{w}"])) or ""
        assert "Rule" in doc and "test_architecture" in doc, w


@pytest.mark.parametrize(
    ("module", "added", "expected"),
    [
        ("fer_sweep.core.data", "from fer_sweep.sweep import store", "core -> outside the core"),
        ("fer_sweep.core.train", "import mlflow", "core -> outside the core"),
        ("fer_sweep.core.models", "from hydra import compose", "core -> outside the core"),
        ("fer_sweep.sweep.job", "from fer_sweep.tools.report import cli", "sweep -> tools"),
        (
            "fer_sweep.tools.ensemble",
            "from fer_sweep.sweep.tracking import _open_parents",
            "tools -> a private name",
        ),
        # dataset is the data's leaf: importing the readers back from it closes a circle
        ("fer_sweep.core.dataset", "from fer_sweep.core import sources", "import circle"),
    ],
)
def test_a_broken_rule_is_named(module, added, expected):
    modules = read_tree()
    modules[module] = modules[module] + f"\n\ndef _added():\n    {added}\n"
    found = violations(modules)
    assert any(v.startswith(expected) and module in v for v in found), found
