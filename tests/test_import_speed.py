"""Catalog commands never import torch (nor transformers/peft), plugins included.

The commands run through the real console entry point (``adaptr.cli.main``) in a fresh interpreter,
against a populated catalog; after each one ``sys.modules`` must hold no heavy library. Plugin
modules are imported when the CLI starts, so this also holds every installed plugin to lazy imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "triton")

SCRIPT = """
import json, sys, time
argvs = json.loads(sys.argv[1])
from adaptr.cli import main
for argv in argvs:
    t = time.perf_counter()
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code or 0
    heavy = sorted(m for m in HEAVY if m in sys.modules)
    print("\\n@@" + json.dumps({"argv": argv, "code": code, "heavy": heavy, "seconds": time.perf_counter() - t}))
"""

COMMANDS = [
    ["--help"],
    ["ls", "--json"],
    ["ls", "--kind", "adapter", "--rank", "4"],
    ["show", "chat-r4", "--json"],
    ["show", "llama"],
    ["lineage", "llama"],
    ["lineage", "chat-r4", "--json"],
    ["adapter", "ls", "--json"],
    ["base", "show", "llama", "--json"],
    ["plugins", "--json"],
    ["db", "current", "--json"],
    ["verify", "--json"],
    ["show", "missing"],  # error paths stay light too
]


@pytest.fixture
def populated(cli, demo_set: dict) -> None:
    for args in (
        ["base", "add", demo_set["base"], "--name", "llama"],
        ["adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama"],
        ["adapter", "add", demo_set["adapters"]["code-r8"], "--base", "llama", "--tag", "x"],
    ):
        code, _, err = cli(*args)
        assert code == 0, err


def run_commands(argvs: list[list[str]]) -> list[tuple[dict, str]]:
    """Run the commands one after another in one fresh interpreter; after each, record what is imported.

    A command that pulls torch in is named even though later ones share the process."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("HEAVY", repr(HEAVY)), json.dumps(argvs)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    chunks = proc.stdout.split("\n@@")
    outputs, results = [chunks[0]], []
    for chunk in chunks[1:]:
        line, _, rest = chunk.partition("\n")
        results.append(json.loads(line))
        outputs.append(rest)
    assert [r["argv"] for r in results] == argvs, (proc.stdout, proc.stderr)
    return list(zip(results, outputs[:-1]))


def test_catalog_commands_do_not_import_torch(populated) -> None:
    results = run_commands(COMMANDS)
    offenders = [" ".join(r["argv"]) + f" -> {r['heavy']}" for r, _ in results if r["heavy"]]
    assert not offenders, f"catalog commands imported heavy libraries: {offenders}"
    for r, out in results:
        assert r["code"] == (2 if r["argv"] == ["show", "missing"] else 0), (r, out)
        if "--json" in r["argv"]:
            json.loads(out)
    assert sum(r["seconds"] for r, _ in results) < 30  # generous; each is typically well under a second


def test_help_alone_in_a_fresh_process_is_light() -> None:
    ((r, out),) = run_commands([["--help"]])
    assert r["code"] == 0 and r["heavy"] == [] and "lineage" in out


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("0", "0")])
def test_cli_asks_torch_for_huge_pages_unless_told_not_to(preset, expected):
    """``main`` sets THP_MEM_ALLOC_ENABLE before torch loads (torch reads it once, at its first
    allocation); a value the user set wins."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    script = (
        "import os, sys\nfrom adaptr.cli import main\n"
        "try:\n    main(['plugins', '--json'])\nexcept SystemExit:\n    pass\n"
        "print('@@', os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == f"@@ {expected} False"
