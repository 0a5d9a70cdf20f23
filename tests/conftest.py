"""Every test gets its own adaptr home and catalog; plugins reload from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def adaptr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "adaptr-home"
    monkeypatch.setenv("ADAPTR_HOME", str(home))
    monkeypatch.setenv("ADAPTR_DATABASE_URL", f"sqlite:///{home / 'catalog.db'}")
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
