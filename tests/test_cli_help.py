"""Every option's --help shows what a user types (NAME[@N], FLOAT, KEY=VALUE), not a type name."""

from __future__ import annotations

import re

import click
import typer

from adaptr.cli import build_app


def _commands(cmd: click.Command, path: str = "adaptr"):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, f"{path} {name}")


def test_no_option_shows_a_python_type():
    root = typer.main.get_command(build_app())
    offenders = []
    for path, cmd in _commands(root):
        ctx = click.Context(cmd, info_name=path)
        for param in cmd.params:
            if not isinstance(param, click.Option):
                continue
            record = param.get_help_record(ctx)
            if record and re.search(r"<[a-z][\w\[\], |]*>", record[0]):
                offenders.append(f"{path}: {record[0]}")
    assert not offenders, "options without a readable metavar:\n" + "\n".join(offenders)
