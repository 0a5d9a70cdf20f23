"""``adaptr db``: schema migrations of the catalog database."""

from __future__ import annotations

import typer

from adaptr.cli.output import JSON_OPTION, emit_json

app = typer.Typer(help="Catalog database schema.", no_args_is_help=True)


@app.command("upgrade")
def upgrade(
    revision: str = typer.Option("head", "--revision", metavar="REVISION", help="Target schema revision."),
    json: bool = JSON_OPTION,
) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from adaptr.services import database

    rev = database.upgrade(revision)
    emit_json({"revision": rev}) if json else typer.echo(f"catalog schema at revision {rev}")


@app.command("current")
def current(json: bool = JSON_OPTION) -> None:
    """Show the schema revision of the catalog database and the one this adaptr needs."""
    from adaptr.services import database

    info = database.current()
    emit_json(info) if json else typer.echo(f"current {info['current'] or 'none'} (head {info['head']})")
