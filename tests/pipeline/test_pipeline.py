"""``adaptr run``: a pipeline file computes each step once, reuses it after, and reports everything.

The example pipeline merges the three demo adapters with TIES, quantizes the merge to NF4 and
exports it as GGUF. Validation errors name the file, the line and the field, and come before
anything is computed.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from cli_helpers import ok_json, register_demo

PIPELINE = """\
version: 1
steps:
  - id: merged
    merge: {{adapters: [chat-r4, code-r8, math-r16-rslora], strategy: ties, density: 0.5, weights: [1, 1, 0.5], name: demo-merged}}
  - id: nf4
    quantize: {{input: merged, method: nf4, double_quant: true, name: demo-merged-nf4}}
  - id: publish
    export: {{input: merged, format: gguf, quant: q8_0, out: {out}}}
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_pipeline_runs_once_then_reuses_everything(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    pipe = write(tmp_path, PIPELINE.format(out="dist/demo.gguf"))

    plan = ok_json(cli, "run", pipe, "--dry-run")
    assert [s["action"] for s in plan["steps"]] == ["compute", "compute", "compute"]
    assert plan["steps"][1]["after"] == ["merged"] and plan["steps"][0]["ref"] == "demo-merged@1"
    assert len(ok_json(cli, "ls")) == 4  # a dry run registers nothing

    first = ok_json(cli, "run", pipe)
    assert [s["action"] for s in first["steps"]] == ["computed"] * 3
    assert first["computed"] == 3 and first["reused"] == 0
    merged, nf4, publish = first["steps"]
    assert merged["ref"] == "demo-merged@1" and nf4["ref"] == "demo-merged-nf4@1"
    assert ok_json(cli, "show", "demo-merged-nf4")["parents"] == [
        {"ref": "demo-merged@1", "operation": "quantize"}
    ]
    gguf_file = tmp_path / "dist" / "demo.gguf"  # relative to the pipeline file
    assert gguf_file.is_file() and publish["out"] == str(gguf_file)
    assert merged["recipe_hash"] == ok_json(cli, "show", "demo-merged")["recipe_hash"]

    second = ok_json(cli, "run", pipe)
    assert [s["action"] for s in second["steps"][:2]] == ["reused", "reused"]
    assert [s["ref"] for s in second["steps"][:2]] == ["demo-merged@1", "demo-merged-nf4@1"]
    assert second["steps"][2]["action"] == "reused"  # the GGUF already holds this very artifact
    assert second["computed"] == 0 and second["seconds"] < 5
    assert len(ok_json(cli, "ls")) == 6

    replan = ok_json(cli, "run", pipe, "--dry-run")
    assert [s["action"] for s in replan["steps"]] == ["reuse", "reuse", "reuse"]

    code, text, _ = cli("run", pipe)
    assert code == 0 and "computed 0, reused 3" in text


def test_a_new_adapter_version_makes_new_versions_downstream(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    pipe = write(tmp_path, PIPELINE.format(out="dist/demo.gguf"))
    ok_json(cli, "run", pipe)
    # chat-r4 gets a new version (other weights): the merge and everything after it change.
    ok_json(cli, "adapter", "add", demo_set["adapters"]["code-r8"], "--base", "llama", "--name", "chat-r4",
            "--new-version")  # fmt: skip
    code, _, err = cli("run", pipe)
    # The merge and the quantization become version 2; the GGUF of version 1 is not replaced
    # without --force (its manifest names another artifact).
    assert code == 2 and "step 'publish' (export) failed" in err and "holds an export of demo-merged@1" in err
    assert ok_json(cli, "show", "demo-merged-nf4")["parents"][0]["ref"] == "demo-merged@2"
    forced = ok_json(cli, "run", pipe, "--force")
    assert [s["ref"] for s in forced["steps"][:2]] == ["demo-merged@3", "demo-merged-nf4@3"]
    assert [s["action"] for s in forced["steps"]] == ["computed", "computed", "computed"]
    shown = ok_json(cli, "show", "demo-merged@3")
    assert shown["content_hash"] == ok_json(cli, "show", "demo-merged@2")["content_hash"]
    assert ok_json(cli, "run", pipe)["computed"] == 0


def test_merge_and_quantize_reuse_the_recipe_outside_pipelines(cli, demo_set):
    register_demo(cli, demo_set)
    args = ("merge", "-a", "chat-r4", "-a", "code-r8", "--strategy", "ties", "--name", "m")
    first = ok_json(cli, *args)
    again = ok_json(cli, *args)
    assert first["reused"] is False and again["reused"] is True and again["ref"] == "m@1"
    code, text, _ = cli(*args)
    assert code == 0 and text.startswith("reused the merge of")
    other = ok_json(cli, "merge", "-a", "chat-r4", "-a", "code-r8", "--strategy", "ties", "--name", "m-copy")
    assert other["reused"] is True and other["ref"] == "m-copy@1"
    assert other["content_hash"] == first["content_hash"] and other["metadata"]["reused_from"] == "m@1"
    code, _, err = cli(*args, "--weights", "1,0.7")
    assert code == 2 and "already exists" in err  # another recipe under a taken name, as before
    forced = ok_json(cli, *args, "--force")
    assert forced["reused"] is False and forced["ref"] == "m@2"
    q1 = ok_json(cli, "quantize", "m@1", "--method", "int8", "--name", "q")
    q2 = ok_json(cli, "quantize", "m@1", "--method", "int8", "--name", "q")
    assert q1["reused"] is False and q2["reused"] is True and q2["ref"] == "q@1"


@pytest.mark.parametrize(
    "text, line, message",
    [
        (
            "version: 1\nsteps:\n  - id: a\n    shuffle: {x: 1}\n",
            4,
            "steps[0] (a).shuffle: unknown step type; known: export, merge, quantize",
        ),
        (
            "version: 1\nsteps:\n  - id: a\n    quantize: {input: b, method: nf4, name: q}\n"
            "  - id: b\n    merge: {adapters: [chat-r4], name: m}\n",
            4,
            "steps[0] (a).quantize.input: refers to step 'b', which comes later",
        ),
        (
            "version: 1\nsteps:\n  - id: a\n    quantize: {input: a, method: nf4, name: q}\n",
            4,
            "steps[0] (a).quantize.input: refers to its own step 'a'",
        ),
        (
            "version: 1\nsteps:\n  - id: a\n    merge:\n      adapters: [chat-r4]\n      density: high\n"
            "      name: m\n",
            6,
            "steps[0] (a).merge.density: Input should be a valid number",
        ),
        (
            "version: 1\nsteps:\n  - id: a\n    merge: {adapters: [chat-r4], name: m, bogus: 1}\n",
            4,
            "steps[0] (a).merge.bogus: Extra inputs are not permitted",
        ),
        ("version: 2\nsteps: []\n", 1, "version: expected version: 1, got 2"),
        (
            "version: 1\nsteps:\n  - id: a\n    merge: {adapters: [chat-r4], name: m}\n"
            "  - id: a\n    quantize: {input: m, method: nf4, name: q}\n",
            5,
            "steps[1].id: step id 'a' is used twice",
        ),
        (
            "version: 1\nsteps:\n  - id: a\n    merge: {adapters: [./missing-folder], name: m}\n",
            4,
            "steps[0] (a).merge.adapters[0]: './missing-folder' is neither an earlier step, a catalog artifact "
            "nor an existing folder",
        ),
        (
            "version: 1\nsteps:\n  - id: a\n    export: {input: llama, format: gguf, out: taken.gguf}\n",
            4,
            "already exists and holds no adaptr export; choose another out or pass --force",
        ),
    ],
)
def test_invalid_pipelines_name_file_line_and_field(cli, demo_set, tmp_path, text, line, message):
    register_demo(cli, demo_set)
    (tmp_path / "taken.gguf").write_text("someone else's file")
    pipe = write(tmp_path, text)
    before = ok_json(cli, "ls")
    code, out, err = cli("run", pipe)
    assert code == 2, (out, err)
    assert err.startswith(f"Error: {pipe}:{line}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert ok_json(cli, "ls") == before
    assert (tmp_path / "taken.gguf").read_text() == "someone else's file"


def test_register_missing_folders_once(cli, demo_set, tmp_path):
    pipe = write(
        tmp_path,
        f"""\
        version: 1
        steps:
          - id: m
            merge: {{base: {demo_set["base"]}, adapters: [{demo_set["adapters"]["chat-r4"]}], name: m}}
        """,
    )
    code, _, err = cli("run", pipe)
    assert code == 2 and "pass --register-missing" in err
    plan = ok_json(cli, "run", pipe, "--dry-run", "--register-missing")
    assert any("would register" in n for n in plan["steps"][0]["notes"])
    first = ok_json(cli, "run", pipe, "--register-missing")
    assert first["steps"][0]["action"] == "computed" and len(first["steps"][0]["notes"]) == 2
    again = ok_json(cli, "run", pipe, "--register-missing")
    assert again["steps"][0]["action"] == "reused" and "notes" not in again["steps"][0]
    assert sorted(a["kind"] for a in ok_json(cli, "ls")) == ["adapter", "base", "merged"]


def test_a_failed_step_keeps_the_earlier_ones(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    body = """\
    version: 1
    steps:
      - id: merged
        merge: {adapters: [chat-r4], name: one}
      - id: q
        quantize: {input: merged, method: nf4, skip: [SKIP], name: one-nf4}
    """
    pipe = write(tmp_path, body.replace("SKIP", "model, lm_head"))
    code, _, err = cli("run", pipe)
    assert code == 2 and f"{pipe}:6: step 'q' (quantize) failed: one@1 has no weight" in err
    assert [a["ref"] for a in ok_json(cli, "ls", "--kind", "merged")] == ["one@1"]
    write(tmp_path, body.replace("SKIP", "lm_head"))
    fixed = ok_json(cli, "run", pipe)
    assert [s["action"] for s in fixed["steps"]] == ["reused", "computed"]
    assert json.loads(json.dumps(fixed))["steps"][1]["ref"] == "one-nf4@1"


def test_an_unchanged_rerun_loads_neither_torch_nor_weights(cli, demo_set, tmp_path, adaptr_home):
    """Reuse is decided from the catalog alone: the rerun process never imports torch."""
    import os
    import subprocess
    import sys

    register_demo(cli, demo_set)
    pipe = write(tmp_path, PIPELINE.format(out="dist/demo.gguf"))
    ok_json(cli, "run", pipe)
    probe = (
        "import sys, json, adaptr.cli\n"
        "try:\n    adaptr.cli.main(['run', sys.argv[1], '--json'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(pipe)],
        capture_output=True,
        text=True,
        env={**os.environ, "ADAPTR_HOME": str(adaptr_home)},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["computed"] == 0
    assert "TORCH False" in proc.stderr
