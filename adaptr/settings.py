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
    # REST API (``adaptr serve``)
    api_open_reads: bool = False  # GET endpoints without a token (ADAPTR_API_OPEN_READS=1)
    import_roots: tuple[Path, ...] = ()  # server-side folders POST /v1/bases|adapters may register from
    export_root: Path | None = None  # where API exports and runs write (default HOME/exports)
    max_upload_bytes: int = 2 * 1024**3  # largest adapter upload (ADAPTR_MAX_UPLOAD_BYTES)
    job_workers: int = 1  # jobs run at once per server; more wait queued (ADAPTR_JOB_WORKERS)

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
        api_open_reads=os.environ.get("ADAPTR_API_OPEN_READS", "") not in ("", "0", "false"),
        import_roots=tuple(
            Path(p).expanduser().resolve()
            for p in (os.environ.get("ADAPTR_IMPORT_ROOTS") or "").split(os.pathsep)
            if p.strip()
        ),
        export_root=Path(os.environ.get("ADAPTR_EXPORT_ROOT") or home / "exports").expanduser().resolve(),
        max_upload_bytes=int(os.environ.get("ADAPTR_MAX_UPLOAD_BYTES") or 2 * 1024**3),
        job_workers=max(1, int(os.environ.get("ADAPTR_JOB_WORKERS") or 1)),
    )
