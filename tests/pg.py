"""A throwaway PostgreSQL server for the tests, started from the installed ``initdb``/``pg_ctl``.

The server lives in a fresh temp folder (data directory, unix socket, log) and listens on a free
TCP port of 127.0.0.1 with ``trust`` authentication; it is stopped and deleted at the end of the
session. ``initdb`` refuses to run as root, so as root (CI) the server runs as the ``postgres``
user the Debian package creates (``runuser -u postgres``). Durability is switched off (fsync,
synchronous_commit, full_page_writes): nothing here outlives the session.

Each test gets its own database, created from a template already upgraded to the schema head
(``CREATE DATABASE ... TEMPLATE``) and dropped afterwards. Creating one takes ~0.3 s on a small
box, so the next one is made in a background thread while the current test runs.

``PostgresUnavailable`` says why no server could be started: no binaries, no ``postgres`` user
to run them as root, no psycopg. Binaries are looked up on PATH, then in
``/usr/lib/postgresql/<newest>/bin`` (Debian's layout, not on PATH); ``$ADAPTR_PG_BIN`` names the
folder instead (``ADAPTR_PG_BIN=/nowhere`` shows what happens without PostgreSQL).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

INSTALL_HINT = "install them with `apt-get install -y postgresql` (Debian) or set ADAPTR_PG_BIN"


class PostgresUnavailable(Exception):
    """No throwaway server can be started here; the message says why."""


def find_bin_dir() -> Path:
    env = os.environ.get("ADAPTR_PG_BIN")
    if env:  # explicit: only there
        candidates = [Path(env)]
    else:

        def version(p: Path) -> tuple[int, ...]:
            return tuple(int(x) for x in p.parent.name.split(".") if x.isdigit())

        on_path = shutil.which("pg_ctl")
        candidates = [Path(on_path).parent] if on_path else []
        candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    where = env or "PATH or /usr/lib/postgresql/*/bin"
    raise PostgresUnavailable(f"PostgreSQL binaries (initdb, pg_ctl) not found in {where}; {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``start()`` a private server; ``create_database``/``drop_database`` per test; ``stop()``."""

    user = "postgres"  # the superuser name initdb is told to create

    def __init__(self) -> None:
        self.bin = find_bin_dir()
        try:
            import psycopg  # noqa: F401  (the driver the URLs name)
        except ImportError as e:
            raise PostgresUnavailable(f"psycopg is not installed ({e}); pip install 'psycopg[binary]'") from e
        self.run_as: list[str] = []
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:  # initdb refuses root: run the server as the package's postgres user
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError as e:
                raise PostgresUnavailable(
                    "running as root and there is no `postgres` user to run initdb as; " + INSTALL_HINT
                ) from e
            runuser = shutil.which("runuser")
            if not runuser:
                raise PostgresUnavailable("running as root and `runuser` is missing (util-linux)")
            self.run_as = [runuser, "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="adaptr-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._names = itertools.count(1)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pg-spare")
        self._spare: Future[str] | None = None
        self.started = False

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [*self.run_as, str(self.bin / tool), *args]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=self.root)

    def start(self) -> PostgresServer:
        if self.owner is not None:
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        r = self._pg(
            "initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8", "--no-sync"
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        opts = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        for attempt in range(5):  # another process may take the free port before the server binds it
            self.port = _free_port()
            r = self._pg(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self.root} {opts}",
                "start",
            )
            if r.returncode == 0:
                self.started = True
                break
            time.sleep(0.2 * (attempt + 1))
        else:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed:\n{r.stdout}\n{r.stderr}\n{log[-3000:]}")
        self._make_template()
        return self

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        auth = f"{self.user}:{password}" if password else self.user
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str) -> None:
        """Run statements outside a transaction (CREATE/DROP DATABASE need that)."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)

    def _make_template(self) -> None:
        from adaptr.catalog import db

        self.execute("CREATE DATABASE adaptr_template")
        url = self.url("adaptr_template")
        db.upgrade(url)
        db.get_engine(url).dispose()  # CREATE DATABASE ... TEMPLATE needs it without connections

    def _create(self, blank: bool) -> str:
        name = f"adaptr_{'blank' if blank else 'test'}_{next(self._names)}"
        self.execute(f"CREATE DATABASE {name} TEMPLATE {'template0' if blank else 'adaptr_template'}")
        return self.url(name)

    def create_database(self, *, blank: bool = False) -> str:
        """A fresh database (at the schema head, or ``blank``: no tables at all); its URL."""
        if blank:
            return self._create(True)
        spare, self._spare = self._spare, self._pool.submit(self._create, False)
        return spare.result() if spare is not None else self._create(False)

    def drop_database(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        from adaptr.catalog import db

        db.get_engine(url).dispose()
        self.execute(f"DROP DATABASE IF EXISTS {make_url(url).database} WITH (FORCE)")

    def stop(self) -> None:
        if self._spare is not None:
            self._spare.exception()  # let it finish; the server and its databases go below
            self._spare = None
        self._pool.shutdown()
        if self.started:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
