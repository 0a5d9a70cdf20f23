"""Every merge strategy has a page in docs/strategies/ that matches its code, and every documented
merge config (YAML block or `adaptr merge` line) is one the merge command accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from adaptr.plugins import get_host, get_registry
from adaptr.specs import MergeSpec, validate_spec

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
STRATEGY_DOCS = DOCS / "strategies"
CONFIG_PAGES = [*sorted(STRATEGY_DOCS.glob("*.md")), DOCS / "merging.md"]
SECTIONS = (
    "Concept",
    "When to use",
    "Parameters",
    "Exact formula",
    "Paper",
    "Mapping to mergekit",
    "Mapping to PEFT",
    "Example",
)


def _builtin_strategies() -> list[str]:
    """Strategies of the plugins shipped in the adaptr distribution; third-party ones document themselves."""
    host = get_host()
    return [
        name
        for name, _obj, plugin in get_registry("strategy").items()
        if host.info[plugin].distribution in ("adaptr", None)
    ]


STRATEGIES = _builtin_strategies()


def _strategy(name: str) -> Any:
    return get_registry("strategy").get(name)


def _page(name: str) -> str:
    path = STRATEGY_DOCS / f"{name}.md"
    assert path.is_file(), f"strategy {name!r} has no page: write docs/strategies/{name}.md"
    return path.read_text(encoding="utf-8")


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no `## {title}` section"
    return m.group(1)


def _rows(text: str) -> list[list[str]]:
    """Body rows of the Markdown tables in ``text``, as stripped cells without backticks."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.fullmatch(r"[|\-\s:]+", line):
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        rows.append(cells)
    return [r for r in rows if r[0] not in ("parameter", "strategy")]  # drop header rows


def _fmt(value: Any) -> str:
    """A default as the docs (and YAML) write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def test_builtin_strategies_found() -> None:
    assert {
        "simple",
        "linear",
        "task_arithmetic",
        "ties",
        "magnitude_prune",
        "dare_linear",
        "dare_ties",
    } <= set(STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
def test_page_has_every_section(name: str) -> None:
    text = _page(name)
    assert re.match(rf"# `{re.escape(name)}`", text), f"{name}.md must start with a `# `{name}`` title"
    for title in SECTIONS:
        _section(text, title)


@pytest.mark.parametrize("name", STRATEGIES)
def test_page_documents_exactly_the_paramdefs(name: str) -> None:
    strategy = _strategy(name)
    documented = {row[0]: row for row in _rows(_section(_page(name), "Parameters"))}
    declared = {p.name: p for p in strategy.params}
    assert set(documented) == set(declared), (
        f"docs/strategies/{name}.md documents parameters {sorted(documented)}, "
        f"the strategy declares {sorted(declared)}"
    )
    for pname, p in declared.items():
        _, type_cell, default_cell, *_ = documented[pname]
        assert type_cell == p.type.__name__, (
            f"{name}.md: {pname} is documented as {type_cell}, is {p.type.__name__}"
        )
        assert default_cell == _fmt(p.default), (
            f"{name}.md: {pname} default is documented as {default_cell}, the code says {_fmt(p.default)}"
        )


@pytest.mark.parametrize("name", STRATEGIES)
def test_page_names_params_defaults_and_paper(name: str) -> None:
    strategy = _strategy(name)
    text = _page(name)
    for p in strategy.params:
        assert f"`{p.name}`" in text and _fmt(p.default) in text
    if strategy.paper_url:
        assert strategy.paper_url in text, f"{name}.md does not link its paper {strategy.paper_url}"


@pytest.mark.parametrize("name", STRATEGIES)
def test_index_row_matches_the_code(name: str) -> None:
    text = (STRATEGY_DOCS / "index.md").read_text(encoding="utf-8")
    row = re.search(rf"^\| \[`{re.escape(name)}`\]\({re.escape(name)}\.md\) \|(.*)$", text, re.M)
    assert row, f"docs/strategies/index.md has no table row linking {name}.md"
    strategy = _strategy(name)
    for p in strategy.params:
        assert f"`{p.name}` ({_fmt(p.default)})" in row.group(1), (
            f"index.md row of {name}: `{p.name}` default"
        )
    negatives = "yes" if strategy.allows_negative_weights else "refused"
    assert f"| {negatives} |" in row.group(1), (
        f"index.md row of {name}: negative weights should say {negatives}"
    )


def test_index_states_the_default_strategies(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptr.services.merge import default_strategy

    monkeypatch.delenv("ADAPTR_DEFAULT_STRATEGY", raising=False)
    monkeypatch.delenv("ADAPTR_DEFAULT_MULTI_STRATEGY", raising=False)
    text = (STRATEGY_DOCS / "index.md").read_text(encoding="utf-8")
    assert f"| `ADAPTR_DEFAULT_STRATEGY` | `{default_strategy(1)}` |" in text
    assert f"| `ADAPTR_DEFAULT_MULTI_STRATEGY` | `{default_strategy(2)}` |" in text


# --- documented configs ------------------------------------------------------------------------

YAML_BLOCKS = [
    pytest.param(page, i, block, id=f"{page.name}-{i}")
    for page in CONFIG_PAGES
    for i, block in enumerate(_blocks(page.read_text(encoding="utf-8"), "yaml"))
]
MERGE_LINES = [
    pytest.param(page, line, id=f"{page.name}-{n}")
    for page in CONFIG_PAGES
    for n, line in enumerate(
        line
        for block in _blocks(page.read_text(encoding="utf-8"), "bash")
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("adaptr merge ")
    )
]


def _accepted(spec: MergeSpec) -> None:
    """The strategy takes every parameter the spec gives (what `adaptr merge` checks before any work)."""
    from adaptr.engine import resolve_params
    from adaptr.services.merge import default_strategy

    name = spec.strategy or default_strategy(len(spec.adapters))
    if name in get_registry("strategy"):  # plugin examples (docs/strategies/index.md) are not installed
        resolve_params(_strategy(name), spec.strategy_args())


def test_every_strategy_page_has_a_yaml_and_a_cli_example() -> None:
    for name in STRATEGIES:
        text = _page(name)
        assert _blocks(text, "yaml"), f"{name}.md has no ```yaml example"
        assert any(p.values[0].stem == name for p in MERGE_LINES), f"{name}.md has no `adaptr merge` example"


@pytest.mark.parametrize("page,index,block", YAML_BLOCKS)
def test_yaml_block_is_a_valid_merge_spec(page: Path, index: int, block: str) -> None:
    spec = validate_spec(MergeSpec, yaml.safe_load(block), source=f"{page.name} yaml block {index}")
    _accepted(spec)
    if page.stem in STRATEGIES:
        assert spec.strategy == page.stem, f"{page.name}: a YAML example uses strategy {spec.strategy!r}"


class _Captured(Exception):
    def __init__(self, spec: MergeSpec) -> None:
        super().__init__("captured")
        self.spec = spec


def _parse_merge_line(line: str, monkeypatch: pytest.MonkeyPatch) -> MergeSpec:
    """Run `adaptr merge ...` through the real CLI up to the merge service, and return its MergeSpec."""
    from typer.testing import CliRunner

    import adaptr.services.merge as service
    from adaptr.cli import build_app

    def capture(spec: MergeSpec, **_: Any) -> None:
        raise _Captured(spec)

    monkeypatch.setattr(service, "merge", capture)
    result = CliRunner().invoke(build_app(), shlex.split(line)[1:])
    assert isinstance(result.exception, _Captured), f"`{line}` is rejected: {result.output.strip()}"
    return result.exception.spec


@pytest.mark.parametrize("page,line", MERGE_LINES)
def test_merge_example_is_accepted(
    page: Path, line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = _blocks(page.read_text(encoding="utf-8"), "yaml")
    if blocks:  # `--config merge.yaml` reads the page's first YAML example
        (tmp_path / "merge.yaml").write_text(blocks[0], encoding="utf-8")
    spec = _parse_merge_line(line, monkeypatch)
    _accepted(spec)


@pytest.mark.parametrize("name", STRATEGIES)
def test_cli_example_equals_yaml_example(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _page(name)
    line = next(p.values[1] for p in MERGE_LINES if p.values[0].stem == name)
    from_flags = _parse_merge_line(line, monkeypatch)
    from_yaml = validate_spec(MergeSpec, yaml.safe_load(_blocks(text, "yaml")[0]))
    assert from_flags == from_yaml, (
        f"{name}.md: the CLI example and the YAML example describe different merges"
    )
