"""Every test gets its own adaptr home and catalog; plugins reload from the environment.

The catalog suites (``PG_SUITES``, and any test that takes the ``backend`` fixture) run twice:
on a SQLite file and on a database of a throwaway PostgreSQL server (``tests/pg.py``), their ids
ending in ``[sqlite]``/``[postgres]``. Without PostgreSQL binaries the ``[postgres]`` runs are
skipped with the reason in the summary; under ``CI=true`` such a skip fails the run instead.
Mark a test ``sqlite_only`` to keep it off PostgreSQL (heavy, or about SQLite itself).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

# Modules whose CLI-driven tests run on both databases (tests/test_store.py only where a test
# takes ``backend``: the rest of it never opens a database).
PG_SUITES = {"test_cli_catalog.py", "test_migrations.py", "test_bad_input.py"}
BACKENDS = ("sqlite", "postgres")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: runs against the throwaway PostgreSQL server")
    config.addinivalue_line("markers", "sqlite_only: not parametrized over the PostgreSQL backend")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames or metafunc.definition.get_closest_marker("sqlite_only"):
        return
    if any("backend" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test chooses its own backends
    direct = "backend" in inspect.signature(metafunc.function).parameters
    in_suite = Path(str(metafunc.definition.fspath)).name in PG_SUITES and "cli" in metafunc.fixturenames
    if direct or in_suite:
        metafunc.parametrize("backend", BACKENDS, indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgres":
            item.add_marker(pytest.mark.postgres)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.get_closest_marker("postgres"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI=true: the PostgreSQL suites must run here, but were skipped: {reason}"


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server for the session (started on first use)."""
    from pg import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer().start()
    except PostgresUnavailable as e:
        pytest.skip(f"PostgreSQL suites skipped: {e}")
    yield server
    server.stop()


@dataclass
class Backend:
    """The catalog database a test runs on: ``name`` is sqlite or postgres, ``url`` its URL."""

    name: str
    url: str
    server: object | None = None

    def blank_url(self, tmp_path: Path, name: str = "blank.db") -> str:
        """Another, empty database on the same backend (no tables, no schema revision)."""
        if self.server is None:
            return f"sqlite:///{tmp_path / name}"
        url = self.server.create_database(blank=True)
        self._extra.append(url)
        return url

    def __post_init__(self) -> None:
        self._extra: list[str] = []


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    """The catalog database: a SQLite file in the test's adaptr home unless parametrized."""
    name = getattr(request, "param", "sqlite")
    if name == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'adaptr-home' / 'catalog.db'}")
        return
    server = request.getfixturevalue("pg_server")
    b = Backend("postgres", server.create_database(), server)
    yield b
    for url in [b.url, *b._extra]:
        server.drop_database(url)


@pytest.fixture(autouse=True)
def adaptr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: Backend) -> Path:
    home = tmp_path / "adaptr-home"
    monkeypatch.setenv("ADAPTR_HOME", str(home))
    monkeypatch.setenv("ADAPTR_DATABASE_URL", backend.url)
    monkeypatch.delenv("ADAPTR_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("ADAPTR_LOAD_PLUGINS", raising=False)
    from adaptr.plugins import reset_plugins

    reset_plugins()
    yield home
    reset_plugins()


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def demo_set(fixtures_root: Path) -> dict:
    """One tiny Llama base and three adapters (ranks 4/8/16, one rsLoRA), built once."""
    from adaptr.testing import make_demo_set

    return make_demo_set(fixtures_root / "demo")


@pytest.fixture
def cli():
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from adaptr.cli import build_app

    def run(*args: str, input: str | None = None):
        runner = CliRunner()
        result = runner.invoke(build_app(), [str(a) for a in args], input=input)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return run
