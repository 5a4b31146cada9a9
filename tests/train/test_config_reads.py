"""The training stage reads its run config as attributes (``cfg.lmbda``), never by string key.

``hpcm.config.run_config.RunConfig`` is a frozen dataclass with one typed field per ``KEYS`` entry;
a ``cfg["lmbda"]`` read is a typo that only fails at run time, so this test reads the source of
every module of ``hpcm/train`` with ``ast`` and fails on a string-keyed read of a run config.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from hpcm.train import loop
from tests.paths import REPO

TRAIN = REPO / "hpcm" / "train"
CONFIG_NAMES = {"cfg", "config", "run_cfg"}  # the names a run config travels under


def _is_config(node: ast.expr) -> bool:
    """``cfg``, ``self.cfg``, ``run.cfg``, ..."""
    if isinstance(node, ast.Name):
        return node.id in CONFIG_NAMES
    return isinstance(node, ast.Attribute) and node.attr in CONFIG_NAMES


def string_keyed_reads(source: str) -> list[tuple[int, str]]:
    """(line, text) of every ``cfg["key"]`` and ``cfg.get("key")`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Subscript)
            and _is_config(node.value)
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            found.append((node.lineno, ast.unparse(node)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and _is_config(node.func.value)
        ):
            found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("path", sorted(TRAIN.rglob("*.py")), ids=lambda p: p.name)
def test_no_string_keyed_run_config_reads_in_the_training_stage(path: Path):
    reads = string_keyed_reads(path.read_text())
    assert not reads, (
        f"{path.relative_to(REPO)} reads the run config by string key: "
        + "; ".join(f"line {line}: {text}" for line, text in reads)
        + " - read the RunConfig attribute instead (cfg.lmbda)"
    )


def test_the_check_finds_string_keyed_reads():
    source = (
        'x = cfg["lmbda"]\ny = f"{self.cfg[\'model\']}"\nz = run.cfg.get("seed")\nok = cfg.lmbda\n'
    )
    assert sorted(line for line, _ in string_keyed_reads(source)) == [1, 2, 3]


def test_the_step_reads_on_one_screen():
    """Run.train_step, from batch to optimizer, stays short enough to read at once."""
    lines = len(inspect.getsource(loop.Run.train_step).splitlines())
    assert lines <= 40, f"Run.train_step has {lines} lines; keep the step on one screen (<= 40)"
