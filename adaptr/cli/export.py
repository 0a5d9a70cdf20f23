"""``adaptr export``: an artifact as a file or folder other tools load (GGUF, ...), outside the store."""

from __future__ import annotations

from pathlib import Path

import typer

from adaptr.cli.output import JSON_OPTION, build_spec, catalog, emit_json, human_size


def export(
    name: str = typer.Argument(..., metavar="NAME[@N]", help="Artifact to export."),
    format: str = typer.Option(..., "--format", "-f", metavar="FORMAT", help="gguf or a plugin's exporter."),
    out: Path = typer.Option(..., "--out", "-o", metavar="PATH", help="Output file (gguf) or folder."),
    quant: str = typer.Option(
        None, "--quant", metavar="TYPE", help="Tensor type in the export (gguf: f16, bf16, q8_0, q4_0)."
    ),
    param: list[str] = typer.Option(
        None, "--param", metavar="KEY=VALUE", help="Another exporter parameter, KEY=VALUE."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT if it exists, even when it already holds this export."
    ),
    json: bool = JSON_OPTION,
) -> None:
    """Write an artifact in another format, with a manifest; the catalog entry is left unchanged.

    An OUT that already holds this very export (its manifest matches) is reused: nothing is written.
    """
    from adaptr.services.export import export as run_export
    from adaptr.specs import ExportSpec

    flags = {"input": name, "format": format, "out": out, "quant": quant, "force": force}
    spec = build_spec(ExportSpec, flags, pairs=(("params", param, "--param"),), what="export options")
    result = run_export(spec, catalog=catalog())
    if json:
        emit_json(result)
        return
    opts = ", ".join(f"{k}={v}" for k, v in result["options"].items())
    if result.get("reused"):
        typer.echo(
            f"reused {result['out']}: it already holds {result['artifact']} as {result['format']} ({opts}); "
            f"its manifest matches ({human_size(result['size_bytes'])}, {result['seconds']:.1f} s)"
        )
        return
    typer.echo(
        f"exported {result['artifact']} as {result['format']} ({opts}) → {result['out']} "
        f"({human_size(result['size_bytes'])}, {result['seconds']:.1f} s)"
    )


def register(app: typer.Typer) -> None:
    app.command()(export)
