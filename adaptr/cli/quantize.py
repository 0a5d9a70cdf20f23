"""``adaptr quantize``: flags (or a YAML file with the same keys) → QuantizeSpec → quantize service."""

from __future__ import annotations

from pathlib import Path

import typer

from adaptr.cli.output import BACKEND_OPTION, JSON_OPTION, build_spec, catalog, emit_json, report_lines


def quantize(
    model: str = typer.Argument(None, metavar="MODEL", help="Base or merged model (NAME[@N])."),
    method: str = typer.Option(
        None, "--method", "-m", metavar="METHOD", help="nf4, fp4, int8, fp8 or a plugin's quantizer."
    ),
    double_quant: bool = typer.Option(
        None, "--double-quant/--no-double-quant", help="Quantize the block scales too (nf4, fp4)."
    ),
    blocksize: int = typer.Option(
        None, "--blocksize", metavar="INT", help="Weights per scale block (nf4, fp4; default 64)."
    ),
    skip: list[str] = typer.Option(
        None,
        "--skip",
        metavar="MODULE",
        help="Module left unquantized (repeatable; default: lm_head and the embeddings).",
    ),
    param: list[str] = typer.Option(
        None, "--param", metavar="KEY=VALUE", help="Another quantizer parameter, KEY=VALUE."
    ),
    name: str = typer.Option(None, "--name", metavar="NAME", help="Catalog name of the quantized model."),
    new_version: bool = typer.Option(None, "--new-version", help="Add a new version when NAME exists."),
    max_shard_size: str = typer.Option(
        None, "--max-shard-size", metavar="SIZE", help="Largest output shard (default 5GB)."
    ),
    backend: str = BACKEND_OPTION,
    config: Path = typer.Option(
        None, "--config", metavar="FILE.yaml", help="YAML file with the same keys as these flags."
    ),
    force: bool = typer.Option(
        False, "--force", help="Recompute (as a new version) even when the same recipe exists."
    ),
    json: bool = JSON_OPTION,
) -> None:
    """Quantize a model for serving and record it with its per-tensor error report."""
    from adaptr.services.quantize import quantize as run_quantize
    from adaptr.specs import QuantizeSpec

    flags = {
        "input": model,
        "method": method,
        "double_quant": double_quant,
        "blocksize": blocksize,
        "skip": skip or None,
        "backend": backend,
        "name": name,
        "new_version": new_version,
        "max_shard_size": max_shard_size,
    }
    pairs = (("params", param, "--param"),)
    spec = build_spec(QuantizeSpec, flags, config=config, pairs=pairs, what="quantize options")
    art = run_quantize(spec, catalog=catalog(), force=force)
    if json:
        emit_json(art)
        return
    q = art["metadata"]["quantization"]
    how = "reused" if art["reused"] else "quantized"
    typer.echo(
        f"{how} {art['parents'][0]['ref']} with {q['method']} → {art['ref']} ({art['content_hash'][:12]})"
    )
    for line in report_lines(art["metadata"]):
        typer.echo(line)
    typer.echo(art["path"])


def register(app: typer.Typer) -> None:
    app.command()(quantize)
