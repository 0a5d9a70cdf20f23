"""The example third-party plugin (docs/plugins/example), installed as a real distribution.

These run ``adaptr`` in a subprocess so the plugin is found exactly as a user's install
finds it: through its entry point, not through anything the test registers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

try:
    distribution("adaptr-example")
except PackageNotFoundError:  # pragma: no cover - `make test` installs it
    pytest.fail(
        "the example plugin is not installed: run `make test`, or `pip install -e docs/plugins/example`",
        pytrace=False,
    )


@pytest.fixture
def run(tmp_path: Path):
    """Run ``python -m adaptr ARGS`` with a fresh ADAPTR_HOME; returns the CompletedProcess."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTR_")}
    env.update(ADAPTR_HOME=str(home), ADAPTR_DATABASE_URL=f"sqlite:///{home / 'catalog.db'}")

    def _run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "adaptr", *map(str, args)],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    _run.home = home  # type: ignore[attr-defined]
    return _run


def _plugins(run, **env: str) -> dict[str, dict]:
    p = run("plugins", "--json", **env)
    assert p.returncode == 0, p.stderr
    return {row["name"]: row for row in json.loads(p.stdout)}


def test_listed_with_its_distribution(run) -> None:
    example = _plugins(run)["example"]
    assert example["distribution"] == "adaptr-example"
    assert example["version"] == "0.1.0"
    assert example["module"] == "adaptr_example"
    assert example["hooks"] == ["artifact_recorded", "register_commands"]


def test_audit_log_records_registrations(run, tmp_path: Path) -> None:
    from adaptr.testing import make_llama_base

    base = make_llama_base(tmp_path / "tiny-llama")
    added = run("base", "add", base, "--name", "tiny-llama", "--json")
    assert added.returncode == 0, added.stderr
    artifact = json.loads(added.stdout)

    log = run.home / "example-audit.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines()
    expected = {
        "ref": "tiny-llama@1",
        "kind": "base",
        "content_hash": artifact["content_hash"],
        "operation": "add",
    }
    assert [json.loads(line) for line in lines] == [expected]

    shown = run("example-audit")
    assert shown.returncode == 0, shown.stderr
    assert [json.loads(line) for line in shown.stdout.splitlines()] == [expected]


def test_audit_command_with_empty_log(run) -> None:
    p = run("example-audit")
    assert p.returncode == 0
    assert p.stdout == ""
    assert "no audit entries yet" in p.stderr


def test_disabled_by_name(run, tmp_path: Path) -> None:
    assert "example" not in _plugins(run, ADAPTR_DISABLE_PLUGINS="example")
    p = run("example-audit", ADAPTR_DISABLE_PLUGINS="example")
    assert p.returncode == 2
    assert "No such command" in p.stderr

    from adaptr.testing import make_llama_base

    base = make_llama_base(tmp_path / "tiny-llama")
    added = run("base", "add", base, ADAPTR_DISABLE_PLUGINS="example")
    assert added.returncode == 0, added.stderr
    assert not (run.home / "example-audit.jsonl").exists()


def test_allowlist_excludes_it(run) -> None:
    plugins = _plugins(run, ADAPTR_LOAD_PLUGINS="formats")
    assert set(plugins) == {"formats"}
