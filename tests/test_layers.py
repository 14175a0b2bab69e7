"""The architecture holds: imports in ``src/mechscope`` flow down the layers and form no cycle.

Read from the source with :mod:`ast` (nothing is imported), so a new upward import or cycle fails here
with the offending modules named. Imports under ``if TYPE_CHECKING:`` are annotations only and do not
count; the package root (``mechscope/__init__.py``) re-exports lazily and is exempt. The layers are the
ones in docs/architecture.md.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mechscope"

#: Bottom to top. A module may import its own layer and the layers below it, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "sites", "io", "metrics", "results", "observe", "direction"),  # ground floor
    ("model",),
    ("data",),
    ("features",),
    ("locate",),
    ("steer",),
    ("improve",),
    ("records",),
    ("report", "viewer"),
    ("zoo",),
    ("demo", "cli"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> mechscope modules it imports at run time (``from pkg import submodule`` names the submodule)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if not target.startswith("mechscope"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    graph[name].add(sub if sub in modules else target)
        graph[name].discard(name)
    return {k: {t for t in v if t in modules} for k, v in graph.items()}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the lazy package root
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} belongs to no layer; add {parts[1]!r} to LAYERS and docs/architecture.md")


def test_every_top_level_module_has_a_layer():
    for path in PACKAGE.iterdir():
        if path.name.startswith("_") or path.name == "py.typed" or path.name.startswith("."):
            continue
        layer_of(f"mechscope.{path.stem}")


def test_imports_flow_down():
    upward = []
    for module, targets in import_graph().items():
        own = layer_of(module)
        if own is None:
            continue
        for target in targets:
            other = layer_of(target)
            if other is not None and other > own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {other})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
