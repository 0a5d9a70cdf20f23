"""``adaptr db``: schema migrations of the catalog database."""

from __future__ import annotations

import typer

from adaptr.cli.output import JSON_OPTION, emit_json

app = typer.Typer(help="Catalog database schema.", no_args_is_help=True)


@app.command("upgrade")
def upgrade(revision: str = typer.Option("head", "--revision"), json: bool = JSON_OPTION) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from adaptr.catalog import db

    rev = db.upgrade(revision=revision)
    emit_json({"revision": rev}) if json else typer.echo(f"catalog schema at revision {rev}")


@app.command("current")
def current(json: bool = JSON_OPTION) -> None:
    """Show the schema revision of the catalog database and the one this adaptr needs."""
    from adaptr.catalog import db

    rev = db.current_revision(db.get_engine())
    info = {"current": rev, "head": db.SCHEMA_REVISION, "up_to_date": rev == db.SCHEMA_REVISION}
    emit_json(info) if json else typer.echo(f"current {rev or 'none'} (head {db.SCHEMA_REVISION})")
