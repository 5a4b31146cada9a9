"""The front door: `hpcm --help` lists every command, and each command runs its stage's main."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib

import pytest

from hpcm import cli
from tests.paths import REPO

EXPECTED = ("train", "evaluate", "rd", "tables", "plots", "anchors", "data")


def test_the_console_script_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"hpcm": "hpcm.cli:main"}


def test_help_lists_every_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal width
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    words = " ".join(capsys.readouterr().out.split())
    assert set(cli.COMMANDS) == set(EXPECTED)
    for name, command in cli.COMMANDS.items():
        assert f" {name} {command.summary}" in words, name


def test_python_dash_m_hpcm_is_the_same_front_door_without_loading_torch():
    code = (
        "import runpy, sys; sys.argv = ['hpcm', '--help']\n"
        "try:\n    runpy.run_module('hpcm', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'hpcm --help imported torch'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_each_command_runs_its_stage_main_with_the_rest_of_argv(name, monkeypatch):
    module = importlib.import_module(cli.COMMANDS[name].module)
    seen = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main([name, "--flag", "value", "--help"]) == 7
    assert seen == [["--flag", "value", "--help"]]


def test_an_unknown_or_missing_command_is_a_usage_error(capsys):
    for argv in (["nope"], []):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_a_command_help_is_the_stage_help(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["tables", "--help"])
    assert stop.value.code == 0
    assert "usage: hpcm tables" in capsys.readouterr().out
