"""The shape of the code itself: imports run one way, tests stand apart from benchmarks, functions
fit on a screen. Read from the source with `ast` (nothing is imported), so a cycle hidden behind an
import inside a function counts as a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_jax", "train")
MAX_LINES = 80  # lines of code in one function, docstring and comments excluded


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that `module` imports anywhere (module level or inside functions).
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` imports a.b.c (and its parents)
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def package_graph(package: str) -> dict[str, set[str]]:
    """Imports among the modules of `package`, parents' ``__init__`` excluded as targets: importing
    ``pkg.sub`` runs ``pkg/__init__.py`` first, but that is not an edge of the layering."""
    mods = _modules(package)
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = imports_of(name, path, known)
        graph[name] = {d for d in deps if d != package or name == package}
    return graph


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_of_reads_function_level_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from p import b\n    from . import c\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("import p.b\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    known = {"p", "p.a", "p.b", "p.c"}
    assert imports_of("p.a", pkg / "a.py", known) == {"p.b", "p.c"}
    assert imports_of("p.c", pkg / "c.py", known) == {"p.b"}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = package_graph(package)
    assert len(graph) > 3, graph
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in {package}/: {' -> '.join(cycle)}"


def test_tests_import_nothing_from_bench():
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names
                          if n == "bench" or n.startswith("bench.")]
    assert not offenders, offenders


def code_lines(fn: ast.AST, source: list[str]) -> int:
    """Lines holding code in `fn`'s body (nested functions included), its docstring excluded."""
    body = fn.body
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    lines = set()
    for stmt in body:
        for n in range(stmt.lineno, stmt.end_lineno + 1):
            text = source[n - 1].strip()
            if text and not text.startswith("#"):
                lines.add(n)
    return len(lines)


def function_lengths(package: str) -> list[tuple[int, str, str]]:
    """(code lines, 'path:line name', docstring) of every function in `package`, longest first."""
    rows = []
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text()
        tree, source = ast.parse(text, filename=str(path)), text.splitlines()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}"
                rows.append((code_lines(fn, source), where, ast.get_docstring(fn) or ""))
    return sorted(rows, reverse=True)


def test_code_lines_skips_docstring_and_comments():
    src = 'def f():\n    """doc\n    more"""\n    # why\n    x = 1\n\n    return x\n'
    fn = ast.parse(src).body[0]
    assert code_lines(fn, src.splitlines()) == 2


@pytest.mark.parametrize("package", PACKAGES)
def test_functions_fit_on_a_screen(package):
    rows = function_lengths(package)
    assert rows, package
    long = [f"{where} ({n} lines)" for n, where, doc in rows
            if n > MAX_LINES and "cannot be split" not in doc]
    assert not long, f"functions over {MAX_LINES} lines of code: {long}"


if __name__ == "__main__":  # the longest five of each package: python tests/test_structure.py
    for package in PACKAGES:
        for n, where, _ in function_lengths(package)[:5]:
            print(f"{n:4d}  {where}")
