"""Engine, sessions and the schema-revision gate.

A local SQLite catalog upgrades itself on first use; any other database must be
upgraded explicitly (``adaptr db upgrade``) because it may be shared by other hosts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlmodel import Session, create_engine

from adaptr.errors import OperationError, SchemaOutdatedError
from adaptr.settings import get_settings

# The newest migration; tests assert it equals the head of migrations/versions.
SCHEMA_REVISION = "0003"


def migrations_dir() -> Path:
    here = Path(__file__).resolve().parent.parent
    packaged = here / "_migrations"  # wheel layout (force-included)
    return packaged if packaged.is_dir() else here.parent / "migrations"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _driver_url(url: str) -> str:
    """``postgresql://`` names psycopg2 in SQLAlchemy; use psycopg (3, the ``postgres`` extra)
    when psycopg2 is not installed, so a plain PostgreSQL URL works as it is."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            import importlib.util

            if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg"):
                return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    url = _driver_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        eng = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(eng, "connect", _sqlite_pragmas)
        return eng
    return create_engine(url, pool_pre_ping=True)


def get_engine(url: str | None = None) -> Engine:
    return _engine(url or get_settings().database_url)


def alembic_config(url: str):
    import sys

    from alembic.config import Config

    cfg = Config(stdout=sys.stdout)  # its default is sys.stdout as of alembic's import, maybe long closed
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except (OperationalError, ProgrammingError):
        return None


def upgrade(url: str | None = None, revision: str = "head") -> str | None:
    from alembic import command

    url = url or get_settings().database_url
    _CURRENT.discard(url)
    engine = get_engine(url)
    cfg = alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(engine)


_CURRENT: set[str] = set()  # URLs this process found at SCHEMA_REVISION: checked once, not per session


def ensure_schema(url: str | None = None) -> Engine:
    """Return an engine whose schema is current, upgrading a local SQLite file if needed."""
    url = url or get_settings().database_url
    engine = get_engine(url)
    if url in _CURRENT:
        return engine
    try:
        rev = current_revision(engine)
    except Exception as e:  # unreachable server, bad URL
        raise OperationError(f"cannot open the catalog database {_safe(url)}: {e}") from e
    if rev == SCHEMA_REVISION:
        _CURRENT.add(url)
        return engine
    if url.startswith("sqlite"):
        upgrade(url)
        _CURRENT.add(url)
        return engine
    raise SchemaOutdatedError(
        f"catalog database {_safe(url)} is at schema revision {rev or 'none'}, this adaptr needs "
        f"{SCHEMA_REVISION}; run `adaptr db upgrade`"
    )


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    engine = ensure_schema(url)
    with Session(engine, expire_on_commit=False) as session:
        yield session
