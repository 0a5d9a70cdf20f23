"""``adaptr adapter``: register and inspect LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import typer

from adaptr.cli.output import JSON_OPTION, artifact_table, catalog, emit_json, parse_pairs, show_artifact

app = typer.Typer(help="Register and inspect LoRA adapters.", no_args_is_help=True)


@app.command("add")
def add(
    path: Path = typer.Argument(..., help="PEFT adapter folder (adapter_config.json + weights)."),
    base: str = typer.Option(
        ..., "--base", metavar="NAME[@N]", help="Catalog base model it was trained on (NAME[@N])."
    ),
    name: str = typer.Option(None, "--name", metavar="NAME", help="Catalog name (default: the folder name)."),
    tag: list[str] = typer.Option([], "--tag", metavar="TAG", help="Tag to attach (repeatable)."),
    new_version: bool = typer.Option(False, "--new-version", help="Add a new version of an existing name."),
    trained_on: str = typer.Option(
        None,
        "--trained-on",
        metavar="METHOD",
        help="Quantizer of the QLoRA base it was trained on (nf4); merges honour it.",
    ),
    trained_on_param: list[str] = typer.Option(
        None,
        "--trained-on-param",
        metavar="KEY=VALUE",
        help="A parameter of that quantizer, KEY=VALUE (e.g. double_quant=true).",
    ),
    json: bool = JSON_OPTION,
) -> None:
    """Validate an adapter against its base and copy it into the store."""
    a = catalog().add_adapter(
        path,
        base=base,
        name=name,
        tags=tag,
        new_version=new_version,
        trained_on=trained_on,
        trained_on_params=parse_pairs(trained_on_param or [], "--trained-on-param"),
    )
    if json:
        emit_json(a)
    else:
        flags = f" [flags: {', '.join(a['flags'])}]" if a["flags"] else ""
        typer.echo(f"registered {a['ref']} on {a['base']} ({a['content_hash'][:12]}){flags}")


@app.command("ls")
def ls(
    base: str = typer.Option(None, "--base", metavar="NAME[@N]", help="Only adapters of this base."),
    tag: str = typer.Option(None, "--tag", metavar="TAG", help="Only adapters with this tag."),
    rank: int = typer.Option(None, "--rank", metavar="INT", help="Only adapters of this LoRA rank."),
    json: bool = JSON_OPTION,
) -> None:
    """List adapters."""
    rows = catalog().ls(kind="adapter", base=base, tag=tag, rank=rank)
    emit_json(rows) if json else artifact_table(rows)


@app.command("show")
def show(ref: str = typer.Argument(..., metavar="NAME[@N]"), json: bool = JSON_OPTION) -> None:
    """Show one adapter, with its effective scaling per module."""
    a = catalog().show(ref)
    emit_json(a) if json else show_artifact(a)
