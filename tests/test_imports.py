"""Every module of patchgen imports alone in a fresh interpreter; no two modules import each other, lazily
(inside a function) or not; the edge path (patchgen.runtime, patchgen-sample) never imports torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "models", "export", "cli")  # the folders pyproject.toml maps to patchgen.<folder>


def module_files() -> dict[str, Path]:
    """patchgen's module names -> their files: patchgen.runtime, patchgen.runtime.memory, ..."""
    return {f"patchgen.{package}" + ("" if f.stem == "__init__" else f".{f.stem}"): f
            for package in PACKAGES for f in sorted((ROOT / package).glob("*.py"))}


MODULES = module_files()
TORCH_FREE = [m for m in MODULES if m.startswith("patchgen.runtime")] + ["patchgen.cli.sample"]


@pytest.mark.parametrize("module", list(MODULES))
def test_module_imports_alone(module):
    """A circle of top-level imports fails here: the second module finds the first partially initialised."""
    check = "import sys; assert 'torch' not in sys.modules, 'imports torch'" if module in TORCH_FREE else ""
    r = subprocess.run([sys.executable, "-c", f"import {module}; {check}"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]


def imported_modules(module: str, path: Path) -> set[str]:
    """The patchgen modules that `module` (at `path`) imports anywhere in its file, functions included."""
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module or ""
            found.update({base} | {f"{base}.{alias.name}" for alias in node.names})
    return {m for m in found if m in MODULES and m != module}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of `graph` (module -> modules it imports): its strongly connected components of two or
    more modules (Tarjan)."""
    index, low, stack, circles = {}, {}, [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                circles.append(sorted(component))
    for v in graph:
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle_even_through_lazy_imports():
    assert import_circles({m: imported_modules(m, path) for m, path in MODULES.items()}) == []


def test_the_circle_check_finds_a_lazy_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(graph) == [["a", "b", "c"]]
