"""The catalog database as a service: create, inspect and upgrade its schema.

The CLI (``adaptr init``, ``adaptr db``) and the REST API (health, startup) call these; neither
reaches into :mod:`adaptr.catalog.db` itself.
"""

from __future__ import annotations

from typing import Any

from adaptr.settings import get_settings


def init() -> dict[str, Any]:
    """Create the adaptr home (store folder and catalog schema) if missing; where it lives."""
    from adaptr.catalog.db import ensure_schema

    s = get_settings()
    s.store.mkdir(parents=True, exist_ok=True)
    ensure_schema()
    return {"home": str(s.home), "store": str(s.store), "database_url": s.database_url.split("@")[-1]}


def current() -> dict[str, Any]:
    """The schema revision of the catalog database and the one this adaptr needs."""
    from adaptr.catalog import db

    rev = db.current_revision(db.get_engine())
    return {"current": rev, "head": db.SCHEMA_REVISION, "up_to_date": rev == db.SCHEMA_REVISION}


def upgrade(revision: str = "head") -> str | None:
    """Apply migrations up to ``revision``; the revision the database is at afterwards."""
    from adaptr.catalog import db

    return db.upgrade(revision=revision)


def ensure() -> None:
    """Fail (``SchemaOutdatedError``, ``OperationError``) unless the schema is current; a local
    SQLite catalog upgrades itself."""
    from adaptr.catalog.db import ensure_schema

    ensure_schema()
