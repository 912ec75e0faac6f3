"""The house's shape: the import-linter contracts hold, no import cycle between files, no module over 600 lines.

The import graph includes imports made inside functions (grimp reads every import statement), and is built on
the installed layout (scripts/lint_imports.py), where passes/, targets/, runtime/ and trainers/ are
subpackages of bitrl_compile.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def _lint_imports():
    return load_script("scripts/lint_imports.py", "lint_imports")


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    grimp = pytest.importorskip("grimp")
    tree = _lint_imports().installed_tree(tmp_path_factory.mktemp("installed"))
    sys.path.insert(0, str(tree))
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "bitrl_compile"}
    for name in saved:  # grimp finds the package through the import system: let it find the copy
        del sys.modules[name]
    try:
        return grimp.build_graph("bitrl_compile", cache_dir=None)
    finally:
        sys.path.remove(str(tree))
        for name in [n for n in sys.modules if n.split(".")[0] == "bitrl_compile"]:
            del sys.modules[name]
        sys.modules.update(saved)


def import_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_import_cycles_are_found_by_the_check():
    grimp = pytest.importorskip("grimp")
    g = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        g.add_import(importer=a, imported=b)
    assert import_cycles(g) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycle_between_files(graph):
    assert {"bitrl_compile.cli", "bitrl_compile.passes.ternarize", "bitrl_compile.runtime.policy",
            "bitrl_compile.targets.kernels", "bitrl_compile.trainers.ppo"} <= set(graph.modules)  # the whole tree
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (function-local imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_runtime_imports_nothing_else_of_the_project(graph):
    runtime = {m for m in graph.modules if m == "bitrl_compile.runtime" or m.startswith("bitrl_compile.runtime.")}
    outside = {(m, i) for m in runtime for i in graph.find_modules_directly_imported_by(m)
               if i.startswith("bitrl_compile") and i not in runtime}
    assert not outside


def test_import_linter_contracts_hold():
    pytest.importorskip("importlinter")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_imports.py")], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_no_module_over_600_lines():
    files = [p for folder in ("bitrl_compile", "passes", "targets", "runtime", "trainers")
             for p in (ROOT / folder).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
