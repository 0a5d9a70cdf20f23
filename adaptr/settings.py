"""Process-wide settings, read from ``ADAPTR_*`` environment variables on each call.

Reading lazily (not at import) lets tests and long-lived servers change the
environment without reloading modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (value or "").split(",") if n.strip())


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    disable_plugins: tuple[str, ...]
    load_plugins: tuple[str, ...] | None
    trace_plugins: bool

    @property
    def store(self) -> Path:
        return self.home / "store"

    @property
    def is_local_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def get_settings() -> Settings:
    home = Path(os.environ.get("ADAPTR_HOME") or Path.home() / ".adaptr").expanduser().resolve()
    url = os.environ.get("ADAPTR_DATABASE_URL") or f"sqlite:///{home / 'catalog.db'}"
    load = os.environ.get("ADAPTR_LOAD_PLUGINS")
    return Settings(
        home=home,
        database_url=url,
        disable_plugins=_names(os.environ.get("ADAPTR_DISABLE_PLUGINS")),
        load_plugins=_names(load) if load is not None else None,
        trace_plugins=os.environ.get("ADAPTR_TRACE_PLUGINS", "") not in ("", "0", "false"),
    )
