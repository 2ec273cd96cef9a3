"""Import structure of engine/, plugins/ and contrib_heads/, from the source text alone.

    python .ci/import_report.py [--list]

Prints the import cycles (strongly connected groups of modules; imports inside functions count,
``if TYPE_CHECKING:`` blocks do not), the number of imports inside functions and how many of
them carry no reason comment, and the largest module. ``--list`` names every import inside a
function that has no reason comment.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "plugins", "contrib_heads")


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


class _Imports(ast.NodeVisitor):
    def __init__(self, name: str, is_pkg: bool, known: dict) -> None:
        self.name, self.is_pkg, self.known = name, is_pkg, known
        self.depth, self.edges, self.local = 0, set(), []

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        if self.depth:
            self.local.append(node.lineno)
        self.edges.update(self._targets(node))

    visit_ImportFrom = visit_Import

    def _targets(self, node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = self.name.split(".") if self.is_pkg else self.name.split(".")[:-1]
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in self.known else prefix for a in node.names]
        out = []
        for name in names:
            while name and name not in self.known:
                name = name.rpartition(".")[0]
            if name and name != self.name:
                out.append(name)
        return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main() -> None:
    known = modules()
    graph, local, unexplained, sizes = {}, 0, [], {}
    for name, (path, is_pkg) in known.items():
        text = path.read_text()
        visitor = _Imports(name, is_pkg, known)
        visitor.visit(ast.parse(text))
        graph[name] = visitor.edges
        lines = text.split("\n")
        sizes[path.relative_to(ROOT)] = len(lines) - (lines[-1] == "")
        local += len(set(visitor.local))
        unexplained += [f"{path.relative_to(ROOT)}:{n}" for n in sorted(set(visitor.local)) if "#" not in lines[n - 1]]
    groups = cycles(graph)
    for group in groups:
        print("cycle:", " <-> ".join(group))
    print(f"{len(groups)} import cycles ({sum(map(len, groups))} modules)")
    print(f"{local} imports inside functions, {len(unexplained)} without a reason comment")
    biggest = max(sizes, key=sizes.get)
    print(f"largest module: {biggest} ({sizes[biggest]} lines)")
    if "--list" in sys.argv:
        print("\n".join(unexplained))


if __name__ == "__main__":
    main()
