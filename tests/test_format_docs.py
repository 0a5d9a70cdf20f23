"""Every built-in quantizer and exporter is documented, with exactly the parameters it declares."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adaptr.plugins import get_registry, reset_plugins

DOCS = Path(__file__).resolve().parent.parent / "docs"
BUILTIN_QUANTIZERS = ("fp4", "fp8", "int8", "nf4")
BUILTIN_EXPORTERS = {"gguf": "GGUF", "hf": "Hugging Face"}


def test_builtin_quantizers_and_exporters_are_registered():
    reset_plugins()
    assert set(BUILTIN_QUANTIZERS) <= set(get_registry("quantizer").names())
    assert set(BUILTIN_EXPORTERS) <= set(get_registry("exporter").names())


@pytest.mark.parametrize("name", BUILTIN_QUANTIZERS)
def test_quantizer_page_documents_its_parameters(name):
    page = DOCS / "quantizers" / f"{name}.md"
    assert page.is_file(), f"docs/quantizers/{name}.md is missing"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# `{name}`"), "the page's title names the quantizer"
    for section in ("## Parameters", "## On-disk layout", "## Math", "## Error", "## Speed"):
        assert section in text, f"{page.name} lacks {section}"
    quantizer = get_registry("quantizer").get(name)
    documented = set(re.findall(r"^\| `(\w+)` \|", text.split("## Parameters", 1)[1].split("\n## ")[0], re.M))
    assert documented == {p.name for p in quantizer.params}, (documented, quantizer.params)
    index = (DOCS / "quantizers" / "index.md").read_text(encoding="utf-8")
    assert f"({name}.md)" in index, f"docs/quantizers/index.md does not link {name}.md"


@pytest.mark.parametrize("name", sorted(BUILTIN_EXPORTERS))
def test_exporter_is_documented_with_its_parameters(name):
    text = (DOCS / "export.md").read_text(encoding="utf-8")
    sections = [s for s in text.split("\n## ") if s.startswith(BUILTIN_EXPORTERS[name])]
    assert sections, f"docs/export.md has no section on the {name} exporter"
    body = "\n".join(sections)
    assert f"--format {name}" in body
    for p in get_registry("exporter").get(name).params:
        flag = "--quant" if p.name == "quant" else p.name
        assert flag in body, f"docs/export.md does not document {name}'s parameter {p.name}"
