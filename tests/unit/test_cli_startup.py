"""The `zili` command starts light: `zili --help` and `zili models` import neither torch nor the engine,
the server or the database (zili.cli.LAZY_COMMANDS builds those subcommands only when one runs), and a
lazily built subcommand is the same command as before."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from zili.cli import LAZY_COMMANDS, app

ANSI = re.compile(r"\x1b\[[0-9;]*m")
HEAVY = ("torch", "numpy", "zili.engine", "zili.config", "zili.server", "fastapi", "uvicorn", "sqlalchemy",
         "xgrammar", "llguidance")


def test_help_and_models_import_no_heavy_module():
    # A fresh interpreter: this one has imported torch already.
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom zili.cli import app\n"
            "for args in (['--help'], ['models']):\n"
            "    result = CliRunner().invoke(app, args)\n"
            "    assert result.exit_code == 0, result.output\n"
            "print('listed' if 'smollm2-135m' in result.output else 'missing')\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["listed", "[]"]


def test_the_listing_names_every_lazy_command_with_its_help():
    result = CliRunner().invoke(app, ["--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = ANSI.sub("", result.output)
    for name, lazy in LAZY_COMMANDS.items():
        assert re.search(rf"│ {name} +{re.escape(lazy.help)}", text), name


@pytest.mark.parametrize("name", sorted(LAZY_COMMANDS))
def test_a_lazy_command_is_built_whole_when_it_runs(name):
    command = typer.main.get_command(app).commands[name]  # built on first access
    assert command.name == name and command.help == LAZY_COMMANDS[name].help
    assert command.params or getattr(command, "commands", None)  # the real command, not a placeholder
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(rf"Usage: \S+ {name} \[OPTIONS\]", ANSI.sub("", result.output)), result.output


def test_a_mistyped_command_is_refused_with_a_suggestion():
    result = CliRunner().invoke(app, ["serv"])
    assert result.exit_code == 2
    assert "No such command 'serv'" in result.output and "'serve'" in result.output
