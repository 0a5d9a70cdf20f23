"""``adaptr serve`` (the REST API on uvicorn) and ``adaptr token`` (its bearer tokens)."""

from __future__ import annotations

import typer


def serve(
    host: str = typer.Option("127.0.0.1", "--host", metavar="HOST", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", metavar="PORT", help="TCP port to listen on."),
    log_level: str = typer.Option("info", "--log-level", metavar="LEVEL", help="debug, info or warning."),
) -> None:
    """Serve the REST API under /v1 (OpenAPI at /v1/openapi.json) until SIGTERM or Ctrl-C."""
    import uvicorn

    from adaptr.api import create_app
    from adaptr.services import database

    database.init()  # refuse to start on a catalog this adaptr cannot use
    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
        server_header=False,
    )


def register(app: typer.Typer) -> None:
    from adaptr.cli import token

    app.command()(serve)
    app.add_typer(token.app, name="token")
