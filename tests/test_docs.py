"""Undocumented means broken: the docs must match the code they describe."""

from __future__ import annotations

import importlib.util
import inspect
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from adaptr import errors, hookspecs
from adaptr.plugins import REGISTRY_HOOKS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.fixture(scope="module")
def cli_md() -> str:
    return (DOCS / "cli.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def builtin_root() -> Any:
    """The click command tree of the CLI with only built-in plugins loaded."""
    import typer

    with gen.builtin_cli() as app:
        return typer.main.get_command(app)


# --- docs/cli.md -------------------------------------------------------------------------


def test_cli_reference_is_current(cli_md: str) -> None:
    fresh = gen.render()
    assert cli_md == fresh, "docs/cli.md is stale: run `make docs` (scripts/gen_cli_docs.py) and commit it"


def test_every_command_is_in_cli_reference(cli_md: str) -> None:
    headings = set(re.findall(r"^#{2,4} (adaptr(?: [\w-]+)*)$", cli_md, re.M))
    missing = [c for c in gen.command_paths() if c not in headings]
    assert not missing, f"commands missing from docs/cli.md: {missing}; run `make docs`"
    assert "adaptr" in headings


def test_cli_reference_excludes_third_party_plugins(cli_md: str) -> None:
    assert "example-audit" not in cli_md


def test_check_mode_detects_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "cli.md"
    stale.write_text("# CLI reference\n", encoding="utf-8")
    monkeypatch.setattr(gen, "CLI_MD", stale)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0


# --- docs/plugins/hooks.md ---------------------------------------------------------------


def _hookspecs() -> dict[str, list[str]]:
    return {
        name: list(inspect.signature(fn).parameters)
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, "adaptr_spec")
    }


def test_hookspecs_found() -> None:
    assert {"register_readers", "register_commands", "get_kernel", "artifact_recorded"} <= set(_hookspecs())


@pytest.mark.parametrize("hook", sorted(_hookspecs()))
def test_plugin_hook_is_documented(hook: str) -> None:
    text = (DOCS / "plugins" / "hooks.md").read_text(encoding="utf-8")
    signature = f"{hook}({', '.join(_hookspecs()[hook])})"
    headings = re.findall(r"^#{2,4} (\w+\(.*\))$", text, re.M)
    documented = {h.split("(")[0]: h for h in headings}
    assert hook in documented, f"docs/plugins/hooks.md has no section for hook {hook}: add `### {signature}`"
    assert documented[hook] == signature, (
        f"docs/plugins/hooks.md documents {documented[hook]}, but the hookspec is {signature}"
    )


def test_no_documented_hook_is_stale() -> None:
    text = (DOCS / "plugins" / "hooks.md").read_text(encoding="utf-8")
    documented = {h.split("(")[0] for h in re.findall(r"^#{2,4} (\w+)\(.*\)$", text, re.M)}
    assert documented <= set(_hookspecs()), (
        f"hooks.md documents hooks that do not exist: {documented - set(_hookspecs())}"
    )


@pytest.mark.parametrize("kind", sorted(REGISTRY_HOOKS))
def test_registry_kind_is_documented(kind: str) -> None:
    text = (DOCS / "plugins" / "hooks.md").read_text(encoding="utf-8")
    row = rf"^\|\s*`{re.escape(kind)}`\s*\|\s*`{re.escape(REGISTRY_HOOKS[kind])}`\s*\|"
    assert re.search(row, text, re.M), (
        f"registry kind {kind!r} (hook {REGISTRY_HOOKS[kind]}) is missing from the table in hooks.md"
    )


# --- docs/errors.md ----------------------------------------------------------------------


def _error_classes() -> list[type[errors.AdaptrError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.AdaptrError)]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_error_class_is_documented(cls: type[errors.AdaptrError]) -> None:
    text = (DOCS / "errors.md").read_text(encoding="utf-8")
    row = re.search(rf"^\|\s*`{cls.__name__}`\s*\|([^\n]*)$", text, re.M)
    assert row, f"docs/errors.md has no table row for {cls.__name__}"
    cells = [c.strip() for c in row.group(1).split("|")]
    assert cells[:3] == [f"`{cls.code}`", str(cls.exit_code), str(cls.status)], (
        f"docs/errors.md row for {cls.__name__} says code/exit/HTTP {cells[:3]}, "
        f"the class has `{cls.code}`/{cls.exit_code}/{cls.status}"
    )


# --- shell examples ------------------------------------------------------------------------


def _shell_commands(path: Path) -> list[str]:
    """``adaptr ...`` lines of the ```bash blocks, with line continuations joined."""
    text = path.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("adaptr "):
                out.append(line.split(" #")[0].strip())
    return out


def _resolve(root: Any, words: list[str]) -> tuple[Any, list[str]]:
    cmd, rest = root, list(words)
    while rest and getattr(cmd, "commands", None) and rest[0] in cmd.commands:
        cmd = cmd.commands[rest.pop(0)]
    return cmd, rest


QUICKSTART_COMMANDS = _shell_commands(DOCS / "quickstart.md")


def test_quickstart_has_commands() -> None:
    assert len(QUICKSTART_COMMANDS) >= 10


@pytest.mark.parametrize("line", QUICKSTART_COMMANDS)
def test_quickstart_commands_exist(line: str, builtin_root: Any) -> None:
    words = shlex.split(line)[1:]
    cmd, rest = _resolve(builtin_root, words)
    assert cmd is not builtin_root, f"`{line}`: no such adaptr command"
    assert not getattr(cmd, "commands", None), f"`{line}`: {words[0]} needs a sub-command"
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    unknown = [w.split("=")[0] for w in rest if w.startswith("-") and w.split("=")[0] not in opts]
    assert not unknown, f"`{line}`: unknown option(s) {unknown}; see docs/cli.md"
