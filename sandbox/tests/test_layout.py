"""The sandbox's layout: its import graph has no cycle, and its entry point registers every timed job.

import_cycles() reads source only (it imports nothing) and takes any package root, so the same
check can be applied to another package (app/) as it is. It counts every import: at module top,
inside functions (a lazy import only hides a cycle), under `if TYPE_CHECKING:`, relative or
absolute, and importlib.import_module() with a literal name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package rooted at `root` (the directory holding its __init__.py), by
    dotted name; a package's __init__.py is the package itself."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None, int]]:
    """(module name, name imported from it or None, line) for every import anywhere in the tree."""
    here = module if is_package else module.rpartition(".")[0]  # what a relative import starts from
    found: list[tuple[str, str | None, int]] = []

    def absolute(name: str, level: int) -> str:
        base = here
        for _ in range(level - 1):
            base = base.rpartition(".")[0]
        return f"{base}.{name}" if name else base

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node.module or "", node.level) if node.level else node.module or ""
            found += [(source, alias.name, node.lineno) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            name = node.args[0].value
            level = len(name) - len(name.lstrip("."))
            found.append((absolute(name[level:], level) if level else name, None, node.lineno))
    return found


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """For each module of the package, the package's modules it imports, each with the line of
    the first such import."""
    modules = module_files(root, package)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for source, imported, line in _imported_names(tree, name, path.name == "__init__.py"):
            if imported is not None and f"{source}.{imported}" in modules:
                target = f"{source}.{imported}"  # from pkg import submodule
            else:
                # `import a.b.c` or `from a.b import name`: the deepest module of that path.
                target = source
                while target and target not in modules:
                    target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].setdefault(target, line)
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, without recursion: the groups of modules that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for start, targets_of_start in graph.items():
        if start in index:
            continue
        work = [(start, iter(sorted(targets_of_start)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups)


def import_cycles(root: Path, package: str) -> list[str]:
    """One description per group of the package's modules that import each other in a circle:
    the modules, then each import that keeps them in it (module -> module, file:line). Empty
    when the import graph has no cycle."""
    graph = import_graph(root, package)
    files = module_files(root, package)
    described = []
    for group in _strongly_connected(graph):
        lines = [f"cycle among {', '.join(group)}:"]
        for module in group:
            for target, line in sorted(graph[module].items()):
                if target in group:
                    where = files[module].relative_to(root.parent)
                    lines.append(f"    {module} -> {target}  ({where}:{line})")
        described.append("\n".join(lines))
    return described


def test_the_sandbox_has_no_import_cycle() -> None:
    cycles = import_cycles(ROOT / "sandbox", "sandbox")
    assert not cycles, "the sandbox's imports go in a circle:\n" + "\n".join(cycles)


def test_the_entry_point_registers_every_timed_job() -> None:
    """The worker runs jobs by kind through billing.JOB_HANDLERS, which the modules owning them
    fill when imported. A fresh interpreter shows what importing the entry point alone registers
    (in this process the other tests have imported them anyway)."""
    script = "import sandbox.app, sandbox.billing as b; print(' '.join(sorted(b.JOB_HANDLERS)))"
    output = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert output.stdout.split() == sorted(
        [
            "advance_test_clock",
            "expire_session",
            "settle_async_fails",
            "settle_async_succeeds",
            "subscription_schedule_phase",
        ]
    )


# -- the checker itself, on small packages written for the purpose ---------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("files", "members"),
    [
        pytest.param(
            {"a.py": "from . import b\n", "b.py": "def f():\n    from .a import g\n"},
            "pkg.a, pkg.b",
            id="lazy import inside a function",
        ),
        pytest.param(
            {
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
                "b.py": "import pkg.a\n",
            },
            "pkg.a, pkg.b",
            id="TYPE_CHECKING and absolute imports",
        ),
        pytest.param(
            {"sub/__init__.py": "", "sub/c.py": "from .. import d\n", "d.py": "from .sub.c import x\n"},
            "pkg.d, pkg.sub.c",
            id="relative imports across levels",
        ),
        pytest.param(
            {"e.py": "import importlib\nimportlib.import_module('pkg.f')\n", "f.py": "from pkg import e\n"},
            "pkg.e, pkg.f",
            id="importlib.import_module",
        ),
    ],
)
def test_the_checker_finds_cycles(tmp_path: Path, files: dict[str, str], members: str) -> None:
    cycles = import_cycles(_package(tmp_path, files), "pkg")
    assert len(cycles) == 1 and cycles[0].startswith(f"cycle among {members}:")


def test_the_checker_accepts_layers(tmp_path: Path) -> None:
    """A name imported from a package's __init__ is not its submodule; imports downwards only."""
    root = _package(
        tmp_path,
        {
            "__init__.py": "VERSION = 1\n",
            "low.py": "from pkg import VERSION\n",
            "high.py": "from . import low\nfrom .low import VERSION\ndef f():\n    import pkg.low\n",
        },
    )
    assert import_cycles(root, "pkg") == []
    assert import_graph(root, "pkg")["pkg.high"] == {"pkg.low": 1}
