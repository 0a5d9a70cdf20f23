"""``adaptr verify-export``: check an exported folder or file against its adaptr manifest (CI's consuming side)."""

from __future__ import annotations

from pathlib import Path

import typer

from adaptr.cli.output import JSON_OPTION, emit_json, human_size


def verify_export(
    path: Path = typer.Argument(
        ..., metavar="PATH", help="An export folder, or an exported file (its manifest lies beside it)."
    ),
    json: bool = JSON_OPTION,
) -> None:
    """Check an export against its adaptr-manifest.json: exit 0 when every file matches, 3 naming
    each missing, changed or extra file, 2 when there is no readable manifest."""
    from adaptr.errors import VerificationError
    from adaptr.manifest import failure_message, verify

    report = verify(path)
    if json:
        emit_json(report)
    if not report["ok"]:
        raise VerificationError(failure_message(report))
    if not json:
        typer.echo(
            f"ok: {report['path']} matches its manifest: {report['artifact']} as {report['format']}, "
            f"{report['files']} file{'s' if report['files'] != 1 else ''} ({human_size(report['size_bytes'])})"
        )


def register(app: typer.Typer) -> None:
    app.command("verify-export")(verify_export)
