"""The package's shape, read from the source with ``ast`` (nothing is imported): the stages import
leftwards only and without cycles, bench stands left of serving, modules and serving functions stay a
size a reader can hold, and only the repository knows the variant file names."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "kiln"
VARIANT_FILES = ("recipe.json", "figures.json", "model.yaml", "manifest.json", "model.onnx", "model.pt2", "model.xml")
MAX_MODULE_LINES = 600
MAX_SERVING_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    """Every module of kiln by dotted name; a package is named by its ``__init__.py``."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Every import statement, at any depth (a function's lazy import is still a dependency), except
    those under ``if TYPE_CHECKING:``, which never run."""

    def __init__(self) -> None:
        self.found: list[ast.Import | ast.ImportFrom] = []

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append(node)

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        for stmt in node.orelse:
            self.visit(stmt)


def _imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    visitor = _Imports()
    visitor.visit(tree)
    return visitor.found


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _edges(module: str) -> set[str]:
    """The kiln modules ``module`` imports: ``from kiln.x import y`` names ``kiln.x.y`` when that is a
    module and ``kiln.x`` (its ``__init__``) otherwise; ``import kiln.x`` names ``kiln.x``."""
    modules, path = _modules(), _modules()[module]
    found: set[str] = set()
    for node in _imports(_tree(path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
            continue
        base = _absolute(module, path, node)
        if base not in modules:
            continue
        for alias in node.names:
            target = f"{base}.{alias.name}"
            found.add(target if target in modules else base)
    found.discard(module)
    return found


def _cycles() -> list[list[str]]:
    """One import cycle (as the path that closes it) per group of modules that import each other."""
    graph = {m: sorted(_edges(m)) for m in _modules()}
    cycles: list[list[str]] = []
    done: set[str] = set()
    for start in graph:
        if start in done:
            continue
        # Depth-first from ``start``; a back edge to a module on the current path closes a cycle.
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            m, i = stack.pop()
            if i == 0:
                path.append(m)
                on_path.add(m)
            if i < len(graph[m]):
                stack.append((m, i + 1))
                n = graph[m][i]
                if n in on_path:
                    cycle = [*path[path.index(n) :], n]
                    if not any(set(cycle) <= set(c) for c in cycles):
                        cycles.append(cycle)
                elif n not in done:
                    stack.append((n, 0))
            else:
                path.pop()
                on_path.discard(m)
                done.add(m)
    return cycles


def test_the_import_graph_reads_the_way_it_should() -> None:
    """The checks below would pass vacuously if the graph came out empty."""
    assert {"kiln.bench.runner", "kiln.bench.results"} <= set(_modules())
    assert "kiln.bench.results" in _edges("kiln.bench.runner")
    assert "kiln.execution.batcher" in _edges("kiln.serving.manager")


def test_no_import_cycle_in_kiln() -> None:
    cycles = _cycles()
    assert not cycles, "import cycles (lazy imports count): " + "; ".join(" -> ".join(c) for c in cycles)


def _imports_between(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    def inside(module: str, names: tuple[str, ...]) -> bool:
        return any(module == n or module.startswith(n + ".") for n in names)

    return sorted(
        f"{m} imports {n}" for m in _modules() if inside(m, packages) for n in _edges(m) if inside(n, forbidden)
    )


def test_bench_does_not_import_serving() -> None:
    offenders = _imports_between(("kiln.bench",), ("kiln.serving",))
    assert not offenders, "bench stands left of serving: " + "; ".join(offenders)


def test_execution_imports_neither_bench_nor_serving() -> None:
    """Both run models through kiln.execution, so it takes their settings as values."""
    offenders = _imports_between(("kiln.execution",), ("kiln.bench", "kiln.serving"))
    assert not offenders, "kiln.execution is shared by bench and serving: " + "; ".join(offenders)


def test_no_module_over_600_lines() -> None:
    long = {
        m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these modules (lines over {MAX_MODULE_LINES}): {long}"


def test_no_serving_function_over_80_lines() -> None:
    long: dict[str, int] = {}
    for m, p in _modules().items():
        if m == "kiln.serving" or m.startswith("kiln.serving."):
            for node in ast.walk(_tree(p)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = (node.end_lineno or node.lineno) - node.lineno + 1
                    if n > MAX_SERVING_FUNCTION_LINES:
                        long[f"{m}:{node.name} (line {node.lineno})"] = n
    assert not long, f"split these functions (lines over {MAX_SERVING_FUNCTION_LINES}): {long}"


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes: documentation may describe the repository layout."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_variant_file_names_only_in_the_repository() -> None:
    """A literal that is one of the names, or a path or glob made of one ("model.onnx*", "/recipe.json"),
    is code that knows the layout; prose that mentions a name (an error message's fix) is not."""
    names = re.compile(r"[\w./*-]*(?<![\w-])(" + "|".join(map(re.escape, VARIANT_FILES)) + r")[\w.*]*")
    owner = PACKAGE / "repository.py"
    seen: list[str] = []
    for path in _modules().values():
        if path == owner:
            continue
        tree = _tree(path)
        docs = _docstrings(tree)
        seen += [
            f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
            if names.fullmatch(node.value)
        ]
    assert not seen, "the repository owns the variant file names; found them in: " + "; ".join(sorted(seen))


def _imports_of(path: Path) -> set[str]:
    """Every module name an import statement of ``path`` names (absolute imports; lazy ones count)."""
    v = _Imports()
    v.visit(_tree(path))
    names: set[str] = set()
    for node in v.found:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif node.module and not node.level:
            names.add(node.module)
    return names


def test_only_kiln_ray_imports_ray() -> None:
    """Ray stays behind one package (kiln[ray] is optional): the rest of kiln reaches it through kiln.ray."""
    users = sorted(
        m for m, p in _modules().items()
        if any(n == "ray" or n.startswith("ray.") for n in _imports_of(p))
    )  # fmt: skip
    assert users and all(m == "kiln.ray" or m.startswith("kiln.ray.") for m in users), users
