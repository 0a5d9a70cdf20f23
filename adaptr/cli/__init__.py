"""The ``adaptr`` command line: thin commands over :mod:`adaptr.services`.

This module is the CLI's single error boundary: ``AdaptrError`` becomes one line on
stderr and its exit code (0 ok, 1 failed, 2 invalid input, 3 verification failed,
130 interrupted); no command catches domain errors itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from adaptr.errors import AdaptrError


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


class AdaptrGroup(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except AdaptrError as e:
            raise _fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; nothing was registered", 130) from None
        except OSError as e:  # disk full, permissions: the OS says what is wrong
            if os.environ.get("ADAPTR_DEBUG"):
                raise
            raise _fail(
                f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}; nothing was registered", 1
            ) from None
        except typer.Abort:
            raise _fail("aborted", 1) from None


def build_app() -> typer.Typer:
    from adaptr.cli import adapter, base, catalog, db, export, merge, pipeline, plugins, quantize

    app = typer.Typer(
        cls=AdaptrGroup,
        name="adaptr",
        help="Catalog, merge, quantize and export LoRA adapters, with lineage.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    catalog.register(app)
    merge.register(app)
    quantize.register(app)
    export.register(app)
    from adaptr.cli import verify_export

    verify_export.register(app)
    pipeline.register(app)
    app.add_typer(base.app, name="base")
    app.add_typer(adapter.app, name="adapter")
    app.add_typer(db.app, name="db")
    plugins.register(app)
    from adaptr.cli import serve

    serve.register(app)  # serve and token
    from adaptr.plugins import get_host

    get_host().pm.hook.register_commands(app=app)
    return app


def _notes_to_stderr() -> None:
    """Service warnings (e.g. "embeddings were untied") reach the user as one line on stderr."""
    import logging

    logger = logging.getLogger("adaptr")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
        level = os.environ.get("ADAPTR_LOG_LEVEL", "INFO").upper()  # DEBUG: e.g. why a backend was chosen
        logger.setLevel(level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO")
        logger.propagate = False


def _huge_pages_for_large_tensors() -> None:
    """Ask torch (before it is imported) to back tensors of 2 MB and more with transparent huge
    pages: a merge allocates and touches gigabytes of short-lived output buffers, and with 4 KB
    pages a fifth of its CPU time went to page faults. ``THP_MEM_ALLOC_ENABLE=0`` turns it off."""
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> None:
    _huge_pages_for_large_tensors()
    _notes_to_stderr()
    try:
        app = build_app()
    except AdaptrError as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)
    app(args=argv, prog_name="adaptr")
