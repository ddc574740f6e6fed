"""The package's import graph, read from the source (every `import` and `from ... import`, at
module level or inside functions): tests/test_house.py holds it to its layers."""

import ast
from pathlib import Path

PACKAGE = "rwkv_playground"


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        dotted = ".".join(path.relative_to(root).with_suffix("").parts)
        is_init = dotted.endswith(".__init__")
        out[dotted[:-len(".__init__")] if is_init else dotted] = (path, is_init)
    return out


def _resolve(module: str, is_init: bool, level: int, name: str | None) -> str:
    parts = (module if is_init else module.rpartition(".")[0]).split(".")
    if level > 1:
        parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}."""
    mods = modules(root)
    graph = {}
    for module, (path, is_init) in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_init, node.level, node.module) if node.level else (node.module or "")
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    deps.add(candidate if candidate in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[module] = {d for d in deps if d in mods and d != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found
