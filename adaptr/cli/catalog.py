"""Catalog-wide commands: init, ls, show, lineage, rm, verify."""

from __future__ import annotations

from typing import Any

import typer

from adaptr.cli.output import JSON_OPTION, artifact_table, catalog, emit_json, show_artifact, stdout


def init(json: bool = JSON_OPTION) -> None:
    """Create the adaptr home (catalog database and store) if missing."""
    from adaptr.services import database

    info = database.init()
    if json:
        emit_json(info)
    else:
        typer.echo(f"adaptr home: {info['home']}\ncatalog: {info['database_url']}")


def ls(
    kind: str = typer.Option(
        None, "--kind", metavar="KIND", help="base, adapter, merged, quantized or exported."
    ),
    base: str = typer.Option(
        None, "--base", metavar="NAME[@N]", help="Only artifacts built on this base (NAME or NAME@N)."
    ),
    tag: str = typer.Option(None, "--tag", metavar="TAG", help="Only artifacts with this tag."),
    rank: int = typer.Option(None, "--rank", metavar="INT", help="Only adapters of this LoRA rank."),
    json: bool = JSON_OPTION,
) -> None:
    """List every artifact version in the catalog."""
    rows = catalog().ls(kind=kind, base=base, tag=tag, rank=rank)
    emit_json(rows) if json else artifact_table(rows)


def show(ref: str = typer.Argument(..., metavar="NAME[@N]"), json: bool = JSON_OPTION) -> None:
    """Show one artifact: metadata, parents, files and hashes."""
    a = catalog().show(ref)
    emit_json(a) if json else show_artifact(a)


def _tree(graph: dict[str, Any]) -> None:
    from rich.tree import Tree

    edges = graph["edges"]
    nodes = {n["ref"]: n for n in graph["nodes"]}
    # A node with several parents (a merge) hangs under its first parent; the others are named.
    by_child: dict[str, list[dict]] = {}
    for e in edges:
        by_child.setdefault(e["child"], []).append(e)
    children: dict[str, list[dict]] = {}
    for es in by_child.values():
        children.setdefault(es[0]["parent"], []).append({**es[0], "others": [x["parent"] for x in es[1:]]})
    has_parent = set(by_child)

    def label(ref: str) -> str:
        n = nodes[ref]
        mark = "[bold]" if ref == graph["root"] else ""
        return f"{mark}{ref}{'[/bold]' if mark else ''} [dim]({n['kind']}, {n['content_hash'][:12]})[/dim]"

    def grow(tree: Tree, ref: str, seen: set[str]) -> None:
        for e in children.get(ref, []):
            how = e["operation"]
            params = e["params"] or {}
            for key in ("strategy", "method"):  # merges name their strategy, quantizations their method
                if params.get(key):
                    how += f" {params[key]}"
            for key in ("qlora", "requantize"):
                if isinstance(params.get(key), dict):
                    how += f" --{key} {params[key]['method']}"
            if e["others"]:
                how += " with " + ", ".join(e["others"])
            extra = [f"{e['plugin']} {e['plugin_version'] or ''}".strip()] if e["plugin"] else []
            extra += [f"seed {e['seed']}"] if e["seed"] is not None else []
            note = f" [dim]({', '.join(extra)})[/dim]" if extra else ""
            sub = tree.add(f"{label(e['child'])} [cyan]← {how}[/cyan]{note}")
            if e["child"] not in seen:
                grow(sub, e["child"], seen | {e["child"]})

    out = stdout()
    for root in sorted(r for r in nodes if r not in has_parent):
        t = Tree(label(root))
        grow(t, root, {root})
        out.print(t)


def lineage(ref: str = typer.Argument(..., metavar="NAME[@N]"), json: bool = JSON_OPTION) -> None:
    """Show an artifact's ancestors and descendants as a tree."""
    g = catalog().lineage(ref)
    emit_json(g) if json else _tree(g)


def rm(
    ref: str = typer.Argument(..., metavar="NAME[@N]", help="NAME removes every version, NAME@N one."),
    force: bool = typer.Option(False, "--force", help="Also remove every artifact derived from it."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation with --force."),
    json: bool = JSON_OPTION,
) -> None:
    """Remove an artifact from the catalog (and its stored files no one else shares)."""
    cat = catalog()
    if force:
        kids = cat.descendants(ref)
        if kids and not yes:
            typer.confirm(
                f"Also remove {len(kids)} derived artifact(s): {', '.join(kids)}?", abort=True, err=True
            )
    removed = cat.rm(ref, force=force)
    emit_json({"removed": removed}) if json else typer.echo("removed " + ", ".join(removed))


def verify(
    ref: str = typer.Argument(None, metavar="[NAME[@N]]", help="Default: every artifact."),
    json: bool = JSON_OPTION,
) -> None:
    """Re-hash files and report drift from the catalog (exit 3 when any)."""
    from adaptr.errors import VerificationError

    reports = catalog().verify(ref)
    if json:
        emit_json(reports)
    else:
        for r in reports:
            status = "ok" if r["ok"] else "DRIFT"
            typer.echo(f"{r['ref']}: {status} ({r['files']} files)")
            for p in r["problems"]:
                typer.echo(f"  {p['path']}: {p['problem']}")
    bad = [r["ref"] for r in reports if not r["ok"]]
    if bad:
        raise VerificationError(
            f"{len(bad)} artifact(s) changed on disk since they were recorded: {', '.join(bad)}; "
            "restore the files or re-register them with --new-version"
        )


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would be removed."),
    json: bool = JSON_OPTION,
) -> None:
    """Remove leftovers of killed processes and files no artifact references."""
    from adaptr.cli.output import human_size

    report = catalog().gc(dry_run=dry_run)
    if json:
        emit_json(report)
        return
    verb = "would remove" if dry_run else "removed"
    r = report["removed"]
    typer.echo(
        f"{verb} {len(r['staging'])} staging folder(s), {len(r['artifacts'])} unregistered artifact folder(s), "
        f"{len(r['objects'])} unreferenced object(s); {human_size(report['freed_bytes'])}"
    )


def register(app: typer.Typer) -> None:
    for fn in (init, ls, show, lineage, rm, verify, gc):
        app.command()(fn)
