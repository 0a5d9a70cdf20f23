"""``adaptr run``: a declarative pipeline file (merge, quantize, export steps) through the services."""

from __future__ import annotations

from pathlib import Path

import typer

from adaptr.cli.output import JSON_OPTION, catalog, emit_json


def run(
    pipeline: Path = typer.Argument(..., metavar="PIPELINE.yaml", help="The pipeline file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; compute nothing."),
    force: bool = typer.Option(False, "--force", help="Recompute every step and replace export outputs."),
    register_missing: bool = typer.Option(
        False, "--register-missing", help="Register base and adapter folders the catalog does not have yet."
    ),
    json: bool = JSON_OPTION,
) -> None:
    """Run a pipeline: each step is reused when its recipe exists, computed otherwise."""
    from adaptr.services.pipeline import run as run_pipeline

    report = run_pipeline(
        pipeline, catalog=catalog(), force=force, dry_run=dry_run, register_missing=register_missing
    )
    if json:
        emit_json(report)
        return
    width = max(len(s["id"]) for s in report["steps"])
    for s in report["steps"]:
        target = s.get("ref") or s.get("out") or "-"
        extra = f"  (after {', '.join(s['after'])})" if s.get("after") else ""
        notes = "".join(f"  [{n}]" for n in s.get("notes", []))
        typer.echo(
            f"{s['id']:<{width}}  {s['type']:<8}  {s['action']:<8}  {target}  {s['seconds']:.1f} s{extra}{notes}"
        )
    verb = "would compute" if report["dry_run"] else "computed"
    typer.echo(f"{verb} {report['computed']}, reused {report['reused']} in {report['seconds']:.1f} s")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
