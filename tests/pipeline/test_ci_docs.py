"""docs/ci.md is executable: its example pipeline runs (twice, the second time reusing everything),
and its GitHub Actions and GitLab CI files validate against their published schemas."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ok_json

DOC = Path(__file__).resolve().parents[2] / "docs" / "ci.md"


def example(name: str) -> str:
    m = re.search(rf"<!-- example: {name} -->\n```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert m, f"docs/ci.md has no `<!-- example: {name} -->` yaml block"
    return m.group(1)


def test_example_pipeline_runs_and_reruns_for_free(cli, demo_set, tmp_path, backend):
    """On SQLite and on PostgreSQL (the ``backend`` fixture parametrizes both)."""
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama-base")
    for name, folder in zip(("sql", "chat", "math"), demo_set["adapters"].values()):
        ok_json(cli, "adapter", "add", folder, "--base", "llama-base", "--name", name)
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(example("pipeline"))
    first = ok_json(cli, "run", pipe)
    assert [s["action"] for s in first["steps"]] == ["computed"] * 3
    export = tmp_path / "dist" / "llama-merged"
    assert (export / "config.json").is_file() and (export / "adaptr-manifest.json").is_file()
    second = ok_json(cli, "run", pipe)
    assert [s["action"] for s in second["steps"]] == ["reused"] * 3 and second["computed"] == 0
    code, _, err = cli("verify-export", export)
    assert code == 0, err


@pytest.mark.parametrize(
    "name, schema", [("github", "vendor.github-workflows"), ("gitlab", "vendor.gitlab-ci")]
)
def test_ci_examples_follow_their_schemas(tmp_path, name, schema):
    tool = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    if not Path(tool).exists():
        pytest.fail("check-jsonschema is a test dependency: pip install -e '.[test]'")
    path = tmp_path / f"{name}.yml"
    path.write_text(example(name))
    proc = subprocess.run([tool, "--builtin-schema", schema, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / f"{name}-broken.yml"
    broken.write_text(example(name).replace("steps:", "stepz:", 1).replace("script:", "scriptz:", 1))
    assert (
        subprocess.run([tool, "--builtin-schema", schema, str(broken)], capture_output=True).returncode != 0
    )
