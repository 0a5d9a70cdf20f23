"""``adaptr plugins``: what is installed and what each plugin registers."""

from __future__ import annotations

import typer

from adaptr.cli.output import JSON_OPTION, emit_json, stdout


def plugins(json: bool = JSON_OPTION) -> None:
    """List loaded plugins, their distribution and version, and what each registers."""
    from adaptr.plugins import get_host

    rows = get_host().describe()
    if json:
        emit_json(rows)
        return
    from rich.table import Table

    t = Table(show_edge=False, header_style="bold")
    for c in ("PLUGIN", "DISTRIBUTION", "VERSION", "REGISTERS", "HOOKS"):
        t.add_column(c)
    for r in rows:
        reg = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(r["registers"].items())) or "-"
        t.add_row(r["name"], r["distribution"] or "-", r["version"] or "-", reg, ", ".join(r["hooks"]))
    stdout().print(t)
    for r in rows:
        for backend, ops in r["accelerates"].items():
            stdout().print(f"\n[bold]backend {backend}[/bold] ({r['name']}) accelerates:")
            for op, what in ops.items():
                stdout().print(f"  {op}: {what}")


def register(app: typer.Typer) -> None:
    app.command()(plugins)
