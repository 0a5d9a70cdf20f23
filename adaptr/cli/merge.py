"""``adaptr merge`` (filled in by the merge engine)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    return None
