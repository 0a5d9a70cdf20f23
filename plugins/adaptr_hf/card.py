"""The Hugging Face model card (``README.md``): YAML front matter the Hub reads, and the recipe and lineage.

The lineage comes from ``request.artifact["lineage"]`` (the ancestor chain the export service puts
there, the same one ``adaptr-manifest.json`` records); without it the card lists the direct parents.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from adaptr.interfaces import AdapterManifest, ExportRequest

WHAT = {
    "base": "A base model",
    "merged": "A merged model (LoRA adapters merged into their base)",
    "quantized": "A quantized model",
    "adapter": "A LoRA adapter",
}
RELATION = {"merged": "merge", "quantized": "quantized", "adapter": "adapter"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HIDDEN_PARAMS = {"output_hash", "weight"}  # per-edge values, shown elsewhere


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def base_model(request: ExportRequest) -> str | None:
    """A Hub id when the config names one (``_name_or_path``), else the root base's catalog name."""
    art = request.artifact
    if art.get("kind") == "base":
        return None
    source = Path(request.source)
    if isinstance(request.manifest, AdapterManifest):
        named = request.manifest.base_model_name_or_path
    else:
        named = _json(source / "config.json").get("_name_or_path")
    if isinstance(named, str) and _HUB_ID.fullmatch(named) and not Path(named).exists():
        return named
    base = art.get("base")
    return str(base).split("@", 1)[0] if base else None


def _chain(request: ExportRequest) -> dict[str, Any]:
    art = request.artifact
    lineage = art.get("lineage")
    if isinstance(lineage, dict) and "edges" in lineage:
        return lineage
    edges = [{"parent": p["ref"], "child": art["ref"], "operation": p["operation"]} for p in art["parents"]]
    nodes = [{"ref": p["ref"]} for p in art["parents"]] + [{"ref": art["ref"], "kind": art["kind"]}]
    return {"nodes": nodes, "edges": edges}


def _value(v: Any) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_value(v)}" for k, v in params.items() if k not in _HIDDEN_PARAMS)


def _edge_text(child: str, edges: list[dict[str, Any]], kind: str | None) -> str:
    if not edges:
        return f"`{child}`" + (f" ({kind})" if kind else "") + ": registered"
    first = edges[0]
    parents = ", ".join(
        f"`{e['parent']}`" + (f" (weight {e['params']['weight']})" if "weight" in e.get("params", {}) else "")
        for e in edges
    )
    text = f"`{child}`" + (f" ({kind})" if kind else "") + f": {first['operation']} of {parents}"
    details = _params(first.get("params") or {})
    if details:
        text += f"; {details}"
    if first.get("seed") is not None:
        text += f"; seed {first['seed']}"
    if first.get("plugin"):
        version = f" {first['plugin_version']}" if first.get("plugin_version") else ""
        text += f" (plugin {first['plugin']}{version})"
    return text


def tags(request: ExportRequest, chain: dict[str, Any]) -> list[str]:
    out = ["adaptr"]
    if request.artifact.get("kind") == "adapter":
        out += ["lora", "peft"]
    for edge in chain["edges"]:
        params = edge.get("params") or {}
        for key in ("strategy", "method"):
            if isinstance(params.get(key), str):
                out.append(params[key])
    out += list(request.artifact.get("tags") or [])
    return list(dict.fromkeys(out))


def render(request: ExportRequest) -> str:
    import yaml

    from adaptr import __version__

    art = request.artifact
    chain = _chain(request)
    front: dict[str, Any] = {}
    if (base := base_model(request)) is not None:
        front["base_model"] = base
        if art["kind"] in RELATION:
            front["base_model_relation"] = RELATION[art["kind"]]
    front["library_name"] = "peft" if art["kind"] == "adapter" else "transformers"
    front["tags"] = tags(request, chain)
    if art["kind"] != "adapter":
        front["pipeline_tag"] = "text-generation"

    kinds = {n["ref"]: n.get("kind") for n in chain["nodes"]}
    incoming: dict[str, list[dict[str, Any]]] = {}
    for edge in chain["edges"]:
        incoming.setdefault(edge["child"], []).append(edge)
    order = [n["ref"] for n in chain["nodes"]]
    if art["ref"] not in order:
        order.append(art["ref"])

    recipe = incoming.get(art["ref"], [])
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {art['name']} (version {art['version']})",
        "",
        f"{WHAT.get(art['kind'], 'A model')} exported by adaptr {__version__} with "
        f"`adaptr export {art['ref']} --format hf`.",
        "",
        f"- content hash (adaptr): `{art['content_hash']}`",
    ]
    if art.get("base"):
        lines.append(f"- base model in the catalog: `{art['base']}`")
    lines += ["", "## Recipe", ""]
    if recipe:
        lines.append(_edge_text(art["ref"], recipe, None).replace(f"`{art['ref']}`: ", "", 1) + ".")
    else:
        source = (art.get("metadata") or {}).get("source")
        lines.append("Registered as it is" + (f", from `{source}`." if source else "."))
    lines += ["", "## Lineage", "", "Oldest first; every step as adaptr recorded it:", ""]
    for ref in order:
        lines.append(f"- {_edge_text(ref, incoming.get(ref, []), kinds.get(ref))}")
    lines += [
        "",
        "## Files",
        "",
        "`adaptr-manifest.json` lists every file with its size and sha256, and the full lineage with "
        "each step's parameters. Check a copy with `adaptr verify-export DIR`.",
        "",
        "## Usage",
        "",
        "```python",
    ]
    if art["kind"] == "adapter":
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            'base = AutoModelForCausalLM.from_pretrained("BASE_MODEL")',
            'model = PeftModel.from_pretrained(base, "PATH_TO_THIS_FOLDER")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_FOLDER")',
        ]
    lines += ["```", ""]
    return "\n".join(lines)


def write_card(request: ExportRequest) -> str:
    (Path(request.dest) / "README.md").write_text(render(request), encoding="utf-8")
    return "README.md"
