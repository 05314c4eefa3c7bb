"""The house rules a newcomer relies on, checked on every run: layers that only point down (import-linter,
run by `make test`), no import cycles, no hidden function-local project imports, thin jobs, short
functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "bench", "workflows", "pipeline", "index", "synthetic", "models", "runtime")
LIBRARY = ("workflows", "pipeline", "index", "synthetic", "models", "runtime")
MAX_JOB_LINES = 120
MAX_FUNCTION_LINES = 80
# The modules of light Ray work (decode actors and read tasks, fragment writers and shard finalizers, ingest
# tasks, index add tasks, Serve shard replicas): every worker process imports its function's module, and torch
# with the model registry costs seconds of CPU per process (pipeline.embedding.parts took 2.4 s while its
# package imported the encoder).
LIGHT_WORKER_MODULES = ("pipeline.decode_stage", "pipeline.embedding.decode", "pipeline.embedding.windows",
                        "pipeline.embedding.parts", "pipeline.embedding.plan", "pipeline.ingest.shard",
                        "index.distributed", "index.sharded", "workflows.serve.fanout")


def _python_files(packages) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


def _module_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert _module_cycles(graph) == []


def test_function_local_project_imports_say_why():
    """A project import inside a function hides a dependency; it is allowed only for an optional heavy
    dependency, and then carries a comment on its line or the line above saying why."""
    offenders = []
    for path in _python_files(PACKAGES):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                if not any(name.split(".")[0] in PACKAGES for name in names):
                    continue
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {here.strip()}")
    assert offenders == []


def test_jobs_are_thin():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "jobs").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_JOB_LINES} == {}


def test_library_functions_are_short():
    long_ones = []
    for path in _python_files(LIBRARY):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_ones.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert long_ones == []


@pytest.mark.parametrize("name", ["jobs", "workflows", "runtime"])
def test_layer_packages_import(name):
    __import__(name)


def test_light_worker_modules_do_not_import_torch():
    """Each module, imported in order in a fresh interpreter, leaves torch unloaded (the first that loads it
    is named)."""
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    importlib.import_module(name)\n"
              "    if 'torch' in sys.modules:\n"
              "        print(name)\n"
              "        break\n")
    proc = subprocess.run([sys.executable, "-c", script, *LIGHT_WORKER_MODULES], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"{proc.stdout.strip()} imports torch"
