"""Rendering helpers: JSON and tables to stdout, progress and messages to stderr."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

BACKEND_OPTION = typer.Option(
    None,
    "--backend",
    metavar="auto|torch|NAME",
    help="Where the arithmetic runs: auto (default: a GPU backend when one is usable), torch, or a "
    "backend listed by `adaptr plugins` (triton).",
)
JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON to stdout.")


def parse_pairs(items: list[str], flag: str = "--param") -> dict[str, str]:
    """``KEY=VALUE`` flags as a dict; values stay strings, the spec coerces them to declared types."""
    from adaptr.errors import InvalidInputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} gamma=0.05")
        out[key.strip()] = value.strip()
    return out


def build_spec(
    cls: Any,
    flags: dict[str, Any],
    *,
    config: Any = None,
    pairs: tuple[tuple[str, list[str] | None, str], ...] = (),
    what: str = "options",
) -> Any:
    """A command's spec: its YAML file (if any) overlaid by the flags given; repeated
    ``KEY=VALUE`` flags merge into their dict fields (``pairs``: field, values, flag name)."""
    from adaptr.specs import load_yaml, validate_spec

    data = load_yaml(config) if config else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    for key, items, flag in pairs:
        if items:
            given = data.get(key) if isinstance(data.get(key), dict) else {}
            data[key] = {**given, **parse_pairs(items, flag)}
    return validate_spec(cls, data, source=str(config) if config else what)


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def stdout():
    from rich.console import Console

    console = Console(soft_wrap=True)
    if not console.is_terminal:  # pipes and logs get whole lines, not 80-column cuts
        console = Console(soft_wrap=True, width=160)
    return console


def stderr():
    from rich.console import Console

    return Console(stderr=True)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f} dB"


def report_lines(meta: dict[str, Any]) -> list[str]:
    """One-line summaries of a quantization error report and a QLoRA logit report, if present."""
    lines = []
    q = meta.get("quant_report")
    if q and q.get("tensors"):
        ratio = q["source_bytes"] / max(1, q["stored_bytes"])
        lines.append(
            f"quantization: {q['tensors']} tensors, mean relative error {q['mean_rel_error']:.4f} "
            f"(max {q['max_rel_error']:.4f}), max abs error {q['max_abs_error']:.4g}, "
            f"min SNR {_db(q['min_snr_db'])}, {ratio:.2f}× smaller"
        )
    r = meta.get("qlora_report")
    if r:
        parts = [f"{k} {v['max_abs_logit_diff']:.4g}" for k, v in r["models"].items()]
        lines.append(f"max |Δlogit| against {r['reference']}: " + ", ".join(parts))
    return lines


class RichProgress:
    """Progress bars on stderr, drawn only when stderr is a terminal."""

    def __init__(self) -> None:
        self.console = stderr()

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if not self.console.is_terminal:
            yield lambda n, detail=None: None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=True) as p:
            tid = p.add_task(description, total=total, detail="")

            def advance(n: int, detail: str | None = None) -> None:
                if detail is None:
                    p.advance(tid, n)
                else:
                    p.update(tid, advance=n, detail=detail)

            yield advance


def catalog():
    from adaptr.services.catalog import Catalog

    return Catalog(progress=RichProgress())


def artifact_table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    t = Table(show_edge=False, header_style="bold")
    for c in ("REF", "KIND", "BASE", "RANK", "SIZE", "HASH", "TAGS", "FLAGS"):
        t.add_column(c)
    for r in rows:
        rank = r["metadata"].get("ranks") or ([r["metadata"]["r"]] if "r" in r["metadata"] else [])
        t.add_row(
            r["ref"],
            r["kind"],
            r["base"] or "-",
            ",".join(map(str, rank)) or "-",
            human_size(r["size_bytes"]),
            r["content_hash"][:12],
            ",".join(r["tags"]) or "-",
            ",".join(r["flags"]) or "-",
        )
    stdout().print(t)


def show_artifact(a: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(show_header=False, show_edge=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    for key in ("ref", "kind", "base", "path", "storage", "content_hash"):
        t.add_row(key, str(a[key] or "-"))
    t.add_row("size", human_size(a["size_bytes"]))
    t.add_row("parents", ", ".join(f"{p['ref']} ({p['operation']})" for p in a["parents"]) or "-")
    t.add_row("tags", ", ".join(a["tags"]) or "-")
    t.add_row("flags", ", ".join(a["flags"]) or "-")
    for k, v in a["metadata"].items():
        if k in ("scaling", "quant_errors", "quant_report", "qlora_report") or v in (None, [], {}):
            continue
        t.add_row(k, f"{v:.4%}" if k == "trainable_share" else str(v))
    out = stdout()
    out.print(t)
    for line in report_lines(a["metadata"]):
        out.print(line, markup=False, highlight=False)
    errors = a["metadata"].get("quant_errors") or {}
    if errors:
        q = Table(show_edge=False, header_style="bold", title="quantization error per tensor")
        for c in ("TENSOR", "REL ERROR", "MAX ABS ERROR", "SNR dB"):
            q.add_column(c, justify="left" if c == "TENSOR" else "right")
        for name, r in errors.items():
            q.add_row(name, f"{r['rel_error']:.4f}", f"{r['max_abs_error']:.4g}", _db(r["snr_db"]))
        out.print(q)
    files = Table(show_edge=False, header_style="bold")
    for c in ("FILE", "SIZE", "SHA256"):
        files.add_column(c)
    for f in a.get("files", []):
        files.add_row(f["path"], human_size(f["size"]), f["sha256"][:16])
    out.print(files)
