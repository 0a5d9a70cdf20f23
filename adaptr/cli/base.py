"""``adaptr base``: register and inspect base models."""

from __future__ import annotations

from pathlib import Path

import typer

from adaptr.cli.output import JSON_OPTION, artifact_table, catalog, emit_json, show_artifact

app = typer.Typer(help="Register and inspect base models.", no_args_is_help=True)


@app.command("add")
def add(
    path: Path = typer.Argument(..., help="Hugging Face model folder (config.json + safetensors)."),
    name: str = typer.Option(None, "--name", metavar="NAME", help="Catalog name (default: the folder name)."),
    copy: bool = typer.Option(
        False, "--copy/--link", help="Copy into the store, or link in place (default)."
    ),
    tag: list[str] = typer.Option([], "--tag", metavar="TAG", help="Tag to attach (repeatable)."),
    new_version: bool = typer.Option(False, "--new-version", help="Add a new version of an existing name."),
    json: bool = JSON_OPTION,
) -> None:
    """Register a base model without loading its weights."""
    a = catalog().add_base(path, name=name, copy=copy, tags=tag, new_version=new_version)
    emit_json(a) if json else typer.echo(f"registered {a['ref']} ({a['content_hash'][:12]})")


@app.command("ls")
def ls(json: bool = JSON_OPTION) -> None:
    """List base models."""
    rows = catalog().ls(kind="base")
    emit_json(rows) if json else artifact_table(rows)


@app.command("show")
def show(ref: str = typer.Argument(..., metavar="NAME[@N]"), json: bool = JSON_OPTION) -> None:
    """Show one base model."""
    a = catalog().show(ref)
    emit_json(a) if json else show_artifact(a)
