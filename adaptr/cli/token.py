"""``adaptr token``: bearer tokens of the REST API (stored hashed; the secret is shown once)."""

from __future__ import annotations

import typer

from adaptr.cli.output import JSON_OPTION, emit_json, stdout

app = typer.Typer(help="REST API tokens.", no_args_is_help=True)


@app.command("create")
def create(
    scope: str = typer.Option(..., "--scope", metavar="read|write|admin", help="What the token may do."),
    expires: str = typer.Option(None, "--expires", metavar="DURATION", help="Lifetime, e.g. 30d, 12h."),
    name: str = typer.Option(None, "--name", metavar="TEXT", help="A note saying who or what uses it."),
    json: bool = JSON_OPTION,
) -> None:
    """Create a token; its secret is printed once (with --json under the key "token")."""
    from adaptr.services import tokens

    t = tokens.create(scope, expires=tokens.parse_duration(expires) if expires else None, name=name)
    if json:
        emit_json(t)
        return
    typer.echo(t["token"])
    typer.echo(
        f"token {t['id']} ({t['scope']}{', expires ' + t['expires_at'] if t['expires_at'] else ''}); "
        "this is the only time its secret is shown",
        err=True,
    )


@app.command("ls")
def ls(json: bool = JSON_OPTION) -> None:
    """List tokens (never their secrets)."""
    from adaptr.services import tokens

    rows = tokens.ls()
    if json:
        emit_json(rows)
        return
    from rich.table import Table

    t = Table(show_edge=False, header_style="bold")
    for c in ("ID", "SCOPE", "STATE", "NAME", "CREATED", "EXPIRES"):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r["id"],
            r["scope"],
            r["state"],
            r["name"] or "-",
            r["created_at"][:19],
            (r["expires_at"] or "-")[:19],
        )
    stdout().print(t)


@app.command("revoke")
def revoke(
    token_id: str = typer.Argument(..., metavar="ID", help="The id `adaptr token ls` shows."),
    json: bool = JSON_OPTION,
) -> None:
    """Revoke a token: requests with it are refused from now on."""
    from adaptr.services import tokens

    t = tokens.revoke(token_id)
    emit_json(t) if json else typer.echo(f"revoked token {t['id']}")
