"""Every option of `spu` and `spu-tui` says its default in --help: typer's [default: X], or the help text saying what
happens when it is not given."""

from __future__ import annotations

import re

import click
import pytest
import typer.main
from typer.testing import CliRunner

from spu_engine.cli import app as spu
from spu_tui.cli import app as console

NAMED = ("--batch-size", "--max-length", "--lr", "--eval-every", "--checkpoint-every")  # issue 27's


def commands(app: typer.Typer, name: str):
    """(name, click command) of the app's entry and of every visible command under it."""

    def walk(command: click.Command, path: str):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                yield from walk(sub, f"{path} {name}")

    yield from walk(typer.main.get_command(app), name)


def says_default(param: click.Parameter) -> bool:
    """Required (typer says [required]), the help says the default, or typer shows one (not for a flag that is off,
    an empty list or None: typer shows nothing for those)."""
    if param.required or "default" in (getattr(param, "help", None) or "").lower():
        return True
    off_flag = getattr(param, "is_flag", False) and not param.default
    return bool(getattr(param, "show_default", False)) and param.default not in (None, [], ()) and not off_flag


@pytest.mark.parametrize(("app", "name"), [(spu, "spu"), (console, "spu-tui")], ids=["spu", "spu-tui"])
def test_every_option_of_every_command_says_its_default(app, name):
    silent = [
        f"{path} {param.opts[0] if param.opts else param.name}"
        for path, command in commands(app, name)
        for param in command.params
        if param.name != "help" and not getattr(param, "hidden", False) and not says_default(param)
    ]
    assert not silent, silent


def test_spu_train_help_shows_the_default_of_each_run_setting_named_in_the_issue():
    output = CliRunner().invoke(spu, ["train", "--help"], env={"COLUMNS": "300"}).output
    for flag in NAMED:
        row = next(line for line in output.splitlines() if re.match(rf"│\s+{flag}\s", line))
        assert re.search(r"\(default: [^)]+\)", row), row
