"""adaptr-example: keep an audit log of every artifact recorded in the catalog.

A template for plugin authors. A plugin is a module with ``@adaptr.hookimpl``
functions whose names match hooks in ``adaptr.hookspecs``; an implementation may
accept only the hook arguments it uses. See docs/plugins/hooks.md for every hook.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from adaptr import hookimpl
from adaptr.settings import get_settings


def audit_log() -> Path:
    # Read the settings on each call: tests and servers may change ADAPTR_HOME.
    return get_settings().home / "example-audit.jsonl"


@hookimpl
def artifact_recorded(artifact: dict[str, Any], operation: str) -> None:
    # Lifecycle hook: runs after the files are in place and the catalog row is
    # committed. ``artifact`` is what `adaptr show NAME --json` prints.
    entry = {k: artifact[k] for k in ("ref", "kind", "content_hash")}
    log = audit_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(json.dumps({**entry, "operation": operation}) + "\n")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    # Adds `adaptr example-audit`. Import heavy libraries (torch) inside the
    # command, not at module level: every adaptr invocation loads this module.
    @app.command("example-audit")
    def example_audit() -> None:
        """Print the audit log: one JSON line per artifact recorded."""
        log = audit_log()
        if log.is_file():
            typer.echo(log.read_text(encoding="utf-8"), nl=False)
        else:
            typer.echo(f"no audit entries yet ({log})", err=True)
