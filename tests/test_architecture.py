"""The package's shape: stages import only earlier stages, no import cycle, imports at the top.

Stages (docs/architecture.md): util below all; config; data, models, optim; train; evaluate;
analysis; the front door ``hpcm.cli`` (and ``python -m hpcm``) above all, which imports the
stage of a command only when it runs. A module may import its own stage, an earlier stage and
util, never a later one.
Imports are read with ``ast`` (every ``import`` statement, also those inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.paths import REPO

PACKAGE = REPO / "hpcm"
RANK = {
    "util": 0,
    "config": 1,
    "data": 2,
    "models": 2,
    "optim": 2,
    "train": 3,
    "evaluate": 4,
    "analysis": 5,
    "front": 6,
}
# the `hpcm` console script and `python -m hpcm`: above every stage
FRONT = {"hpcm.cli", "hpcm.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> str | None:
    """The stage of a module (None for the package root ``hpcm``)."""
    if module in FRONT:
        return "front"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imported_modules(module: str, node: ast.AST) -> list[str]:
    """The hpcm modules an import statement names (``from hpcm.x import y``: hpcm.x.y when y is a
    module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import
            package = (
                module.split(".")
                if MODULES[module].name == "__init__.py"
                else module.split(".")[:-1]
            )
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
            for alias in node.names
        ]
    found = []
    for name in names:
        while (
            name and name not in MODULES
        ):  # `import hpcm.optim.balanced as b` names the module itself
            name = name.rpartition(".")[0]
        if name.startswith("hpcm"):
            found.append(name)
    return found


def import_nodes(path: Path) -> list[ast.AST]:
    return [
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, (ast.Import, ast.ImportFrom))
    ]


GRAPH = {
    m: sorted({t for n in import_nodes(p) for t in imported_modules(m, n)} - {m})
    for m, p in MODULES.items()
}


def test_every_module_has_a_stage():
    assert FRONT <= set(MODULES)
    unknown = {m for m in MODULES if stage(m) not in (*RANK, None)}
    assert not unknown, f"modules outside the stages {sorted(RANK)}: {sorted(unknown)}"


def test_no_stage_imports_a_later_one():
    problems = []
    for module, targets in GRAPH.items():
        mine = stage(module)
        for target in targets:
            theirs = stage(target)
            if mine is None or theirs is None or theirs == mine:
                continue
            if RANK[theirs] >= RANK[mine]:
                problems.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not problems, "\n".join(problems)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in graph.get(node, []):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    # A package's __init__ importing its submodules is not a cycle: the edges go to the named
    # modules only, not to the packages above them.
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None


def late_imports_without_a_reason(path: Path, root: Path = REPO) -> list[str]:
    """Imports below the top of the module, or inside a function or class, whose line has no
    comment."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    top_level = set()
    for node in tree.body:  # the top: docstring, then imports (also under `if TYPE_CHECKING` / try)
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and node is tree.body[0]
        ):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top_level.add(node)
            continue
        if isinstance(node, (ast.If, ast.Try)) and all(
            isinstance(n, (ast.Import, ast.ImportFrom, ast.Pass, ast.Raise, ast.Expr, ast.Assign))
            for n in ast.walk(node)
            if isinstance(n, ast.stmt) and n is not node
        ):
            top_level.update(
                n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))
            )
            continue
        break
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node in top_level:
            continue
        if not any("#" in lines[i - 1] for i in range(node.lineno, node.end_lineno + 1)):
            problems.append(
                f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
            )
    return problems


def test_imports_sit_at_the_top_unless_a_comment_says_why():
    problems = [p for path in MODULES.values() for p in late_imports_without_a_reason(path)]
    assert not problems, "late imports need a `# why` comment on their line:\n" + "\n".join(
        problems
    )


@pytest.mark.parametrize(
    "source, late",
    [
        ('"""doc"""\nimport os\n\ndef f():\n    import json\n', True),
        ('"""doc"""\nimport os\n\ndef f():\n    import json  # why: slow\n', False),
        ("import os\nX = 1\nimport sys\n", True),
    ],
)
def test_the_late_import_check_can_fail(tmp_path, source, late):
    path = tmp_path / "module.py"
    path.write_text(source)
    assert bool(late_imports_without_a_reason(path, tmp_path)) == late
