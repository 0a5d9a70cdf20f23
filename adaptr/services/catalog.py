"""Catalog services: register, find, describe, verify and remove artifacts.

``Catalog`` is the public Python API for the catalog; the CLI and the REST API call it.
Every artifact is recorded the same way (``record``): files first, fsynced and in
place, then one transaction for the row, its files, tags and lineage edges.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from adaptr.catalog.db import session_scope
from adaptr.catalog.models import Artifact, ArtifactFile, LineageEdge, Tag
from adaptr.errors import (
    AdaptrError,
    HasDescendantsError,
    InvalidInputError,
    NameTakenError,
    NotFoundError,
    OperationError,
)
from adaptr.interfaces import AdapterManifest, ModelManifest
from adaptr.io.files import sha256_file
from adaptr.plugins import get_host, get_registry
from adaptr.progress import NullProgress, Progress
from adaptr.refs import check_name, parse_ref
from adaptr.settings import get_settings
from adaptr.store import FileEntry, Store, content_hash, hash_folder, list_files


@dataclass
class Parent:
    """A lineage edge to record: ``artifact`` is the parent of the new artifact."""

    artifact: Artifact
    operation: str
    params: dict[str, Any] = field(default_factory=dict)
    plugin: str | None = None
    plugin_version: str | None = None
    seed: int | None = None


class Catalog:
    """Artifacts, their files and lineage, in the database named by the settings."""

    def __init__(
        self,
        *,
        database_url: str | None = None,
        home: str | Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        settings = get_settings()
        root = Path(home).expanduser().resolve() if home else None
        self.database_url = database_url or (
            f"sqlite:///{root / 'catalog.db'}" if root else settings.database_url
        )
        self.store = Store(root / "store" if root else settings.store)
        self.progress: Progress = progress or NullProgress()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.database_url) as s:
            yield s

    # --- lookups -------------------------------------------------------------------------

    def resolve(self, session: Session, ref: str) -> Artifact:
        name, version = parse_ref(ref)
        q = select(Artifact).where(Artifact.name == name)
        q = q.where(Artifact.version == version) if version else q.order_by(col(Artifact.version).desc())
        art = session.exec(q.limit(1)).first()
        if art is None:
            what = f"version {version} of {name!r}" if version else f"artifact {name!r}"
            raise NotFoundError(f"{what} is not in the catalog; see `adaptr ls`")
        return art

    def _versions(self, session: Session, ref: str) -> list[Artifact]:
        name, version = parse_ref(ref)
        if version:
            return [self.resolve(session, ref)]
        arts = list(session.exec(select(Artifact).where(Artifact.name == name).order_by(Artifact.version)))
        if not arts:
            raise NotFoundError(f"artifact {name!r} is not in the catalog; see `adaptr ls`")
        return arts

    def next_version(self, session: Session, name: str, kind: str, new_version: bool) -> int:
        check_name(name)
        latest = session.exec(
            select(Artifact).where(Artifact.name == name).order_by(col(Artifact.version).desc()).limit(1)
        ).first()
        if latest is None:
            return 1
        if not new_version:
            raise NameTakenError(
                f"artifact {name!r} already exists (latest {name}@{latest.version}); choose another name "
                "or pass --new-version"
            )
        if latest.kind != kind:
            raise InvalidInputError(
                f"artifact {name!r} is a {latest.kind}; a new version must also be a {latest.kind}"
            )
        return latest.version + 1

    def find_recipe(self, session: Session, recipe: str, name: str) -> Artifact | None:
        """The artifact already computed from ``recipe``: one named ``name`` first, else any."""
        rows = session.exec(
            select(Artifact).where(Artifact.recipe_hash == recipe).order_by(col(Artifact.id).desc())
        ).all()
        return next((a for a in rows if a.name == name), rows[0] if rows else None)

    def adopt(
        self,
        existing: Artifact,
        *,
        name: str,
        new_version: bool,
        parents: Sequence[Parent],
        operation: str,
    ) -> dict[str, Any]:
        """A request whose recipe ``existing`` already computed: that artifact when it has the
        requested name, else a new one under ``name`` that links its files (``reuse``)."""
        if existing.name == name:
            return self.show(_ref(existing))
        return self.reuse(existing, name=name, new_version=new_version, parents=parents, operation=operation)

    def reuse(
        self,
        existing: Artifact,
        *,
        name: str,
        new_version: bool,
        parents: Sequence[Parent],
        operation: str,
    ) -> dict[str, Any]:
        """``existing`` under another name: its stored files are linked, nothing is recomputed."""
        with self.session() as s:
            files = s.exec(select(ArtifactFile).where(ArtifactFile.artifact_id == existing.id)).all()
        staged = self.store.staging()
        try:
            for f in files:
                dest = staged / f.relpath
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = Path(existing.path) / f.relpath
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copyfile(src, dest)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        try:
            with self.session() as s:  # refuse a taken name before linking anything
                self.next_version(s, name, existing.kind, new_version)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return self.record(
            name=name,
            kind=existing.kind,
            new_version=new_version,
            staged=staged,
            manifest=dict(existing.manifest),
            meta={**existing.meta, "reused_from": _ref(existing)},
            parents=parents,
            base_id=existing.base_id,
            rank=existing.rank,
            flags=existing.flags,
            operation=operation,
            known_hashes={f.relpath: f.sha256 for f in files},
            recipe_hash=existing.recipe_hash,
        )

    # --- JSON views ----------------------------------------------------------------------

    def to_json(self, session: Session, art: Artifact, *, files: bool = True) -> dict[str, Any]:
        (out,) = self.to_json_many(session, [art])
        if files:
            rows = session.exec(
                select(ArtifactFile).where(ArtifactFile.artifact_id == art.id).order_by(ArtifactFile.relpath)
            ).all()
            out["files"] = [{"path": f.relpath, "size": f.size, "sha256": f.sha256} for f in rows]
        return out

    def to_json_many(self, session: Session, arts: Sequence[Artifact]) -> list[dict[str, Any]]:
        """``show`` bodies (without files) for many artifacts in three queries, not three per row:
        listings stay fast while a merge keeps the database busy."""
        ids = [a.id for a in arts]
        if not ids:
            return []
        tags: dict[int, list[str]] = {}
        for aid, tag in session.exec(
            select(Tag.artifact_id, Tag.tag).where(col(Tag.artifact_id).in_(ids)).order_by(Tag.tag)
        ):
            tags.setdefault(aid, []).append(tag)
        # Parents and bases by name and version only: their JSON columns (a manifest is kilobytes)
        # would be decoded once per edge, most of a listing's time on a catalog of merges.
        parents: dict[int, list[dict[str, str]]] = {}
        for child_id, operation, name, version in session.exec(
            select(LineageEdge.child_id, LineageEdge.operation, Artifact.name, Artifact.version)
            .where(col(LineageEdge.child_id).in_(ids), LineageEdge.parent_id == Artifact.id)
            .order_by(LineageEdge.id)
        ):
            parents.setdefault(child_id, []).append({"ref": f"{name}@{version}", "operation": operation})
        base_ids = {a.base_id for a in arts if a.base_id}
        bases = (
            {
                i: f"{name}@{version}"
                for i, name, version in session.exec(
                    select(Artifact.id, Artifact.name, Artifact.version).where(col(Artifact.id).in_(base_ids))
                )
            }
            if base_ids
            else {}
        )
        return [
            {
                "name": art.name,
                "version": art.version,
                "ref": _ref(art),
                "kind": art.kind,
                "content_hash": art.content_hash,
                "recipe_hash": art.recipe_hash,
                "size_bytes": art.size_bytes,
                "path": art.path,
                "storage": art.storage,
                "base": bases.get(art.base_id) if art.base_id else None,
                "parents": parents.get(art.id, []),
                "tags": tags.get(art.id, []),
                "flags": list(art.flags),
                "metadata": dict(art.meta),
                "created_at": _utc(art.created_at).isoformat(),
            }
            for art in arts
        ]

    def show(self, ref: str) -> dict[str, Any]:
        with self.session() as s:
            return self.to_json(s, self.resolve(s, ref))

    def manifest(self, ref: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The artifact (as ``show``) and the reader manifest recorded for it."""
        with self.session() as s:
            art = self.resolve(s, ref)
            return self.to_json(s, art), dict(art.manifest)

    def ls(
        self,
        *,
        kind: str | None = None,
        base: str | None = None,
        tag: str | None = None,
        rank: int | None = None,
    ) -> list[dict[str, Any]]:
        with self.session() as s:
            q = select(Artifact)
            if kind:
                q = q.where(Artifact.kind == kind)
            if rank is not None:
                q = q.where(Artifact.rank == rank)
            if tag:
                q = q.where(col(Artifact.id).in_(select(Tag.artifact_id).where(Tag.tag == tag)))
            if base:
                ids = [a.id for a in self._versions(s, base)]
                q = q.where(col(Artifact.base_id).in_(ids))
            arts = s.exec(q.order_by(Artifact.name, Artifact.version)).all()
            return self.to_json_many(s, arts)

    # --- lineage -------------------------------------------------------------------------

    def _walk(self, session: Session, start: Iterable[int], up: bool) -> list[LineageEdge]:
        seen: set[int] = set(start)
        frontier = list(seen)
        edges: list[LineageEdge] = []
        while frontier:
            src, dst = (
                (LineageEdge.child_id, LineageEdge.parent_id)
                if up
                else (LineageEdge.parent_id, LineageEdge.child_id)
            )
            batch = session.exec(select(LineageEdge).where(col(src).in_(frontier))).all()
            edges.extend(batch)
            frontier = []
            for e in batch:
                nxt = getattr(e, dst.key)
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        return edges

    def lineage(self, ref: str) -> dict[str, Any]:
        with self.session() as s:
            art = self.resolve(s, ref)
            edges = self._walk(s, [art.id], up=True) + self._walk(s, [art.id], up=False)
            ids = {art.id} | {e.parent_id for e in edges} | {e.child_id for e in edges}
            arts = {a.id: a for a in s.exec(select(Artifact).where(col(Artifact.id).in_(ids)))}
            uniq = {e.id: e for e in edges}
            return {
                "root": _ref(art),
                "nodes": self.to_json_many(s, [arts[i] for i in sorted(ids)]),
                "edges": [
                    {
                        "parent": _ref(arts[e.parent_id]),
                        "child": _ref(arts[e.child_id]),
                        "operation": e.operation,
                        "params": e.params,
                        "plugin": e.plugin,
                        "plugin_version": e.plugin_version,
                        "seed": e.seed,
                    }
                    for e in sorted(uniq.values(), key=lambda e: e.id)
                ],
            }

    # --- recording -----------------------------------------------------------------------

    def record(
        self,
        *,
        name: str,
        kind: str,
        new_version: bool = False,
        staged: Path | None = None,
        linked: Path | None = None,
        linked_files: list[Path] | None = None,
        manifest: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        parents: Sequence[Parent] = (),
        base_id: int | None = None,
        rank: int | None = None,
        flags: Sequence[str] = (),
        tags: Sequence[str] = (),
        operation: str = "add",
        known_hashes: dict[str, str] | None = None,
        recipe_hash: str | None = None,
    ) -> dict[str, Any]:
        """Put the files in place, then commit the row; nothing is registered half-written.

        Safe against other processes registering the same name at once, on SQLite and PostgreSQL:
        files are hashed and linked into a folder of their own first; then, holding the name's
        store lock, the version is chosen from the committed rows, the folder renamed into place
        and the row committed. A loser gets ``NameTakenError`` (or, with ``new_version``, the next
        version); a unique-constraint violation from a process that does not share this store
        (another host on the same database) is turned into the same error.
        """
        check_name(name)
        total = _total_size(staged or linked, linked_files)
        built = None
        with self.progress.task(f"hashing {name}", total) as advance:
            if staged is not None:
                built = self.store.build(staged, advance, known_hashes)
                entries, storage = built.entries, "store"
            else:
                assert linked is not None
                folder, storage = linked.resolve(), "link"
                entries = hash_folder(folder, advance, files=linked_files)
        try:
            for attempt in range(_RECORD_ATTEMPTS):
                with self.store.lock(name), self.session() as s:
                    version = self.next_version(s, name, kind, new_version)
                    if built is not None:
                        folder = self.store.place(built, name, version)
                    try:
                        art = Artifact(
                            name=name,
                            version=version,
                            kind=kind,
                            content_hash=content_hash(entries),
                            size_bytes=sum(e.size for e in entries),
                            path=str(folder),
                            storage=storage,
                            base_id=base_id,
                            rank=rank,
                            meta=meta or {},
                            manifest=manifest or {},
                            flags=sorted(set(flags)),
                            recipe_hash=recipe_hash,
                        )
                        s.add(art)
                        s.flush()
                        for e in entries:
                            s.add(
                                ArtifactFile(
                                    artifact_id=art.id, relpath=e.relpath, size=e.size, sha256=e.sha256
                                )
                            )
                        for t in sorted(set(tags)):
                            s.add(Tag(artifact_id=art.id, tag=t))
                        for p in parents:
                            s.add(
                                LineageEdge(
                                    parent_id=p.artifact.id,
                                    child_id=art.id,
                                    operation=p.operation,
                                    params={**p.params, "output_hash": art.content_hash},
                                    plugin=p.plugin,
                                    plugin_version=p.plugin_version,
                                    seed=p.seed,
                                )
                            )
                        s.commit()
                    except IntegrityError as e:
                        s.rollback()
                        if built is not None:
                            self.store.unplace(built, name, version)
                        if not _is_name_version_conflict(e):
                            raise InvalidInputError(
                                f"{name} could not be registered: an artifact it refers to (its base or an "
                                "input) was removed from the catalog meanwhile; nothing was registered"
                            ) from None
                        if new_version and attempt + 1 < _RECORD_ATTEMPTS:
                            continue  # another host took this version: take the next one
                        self.next_version(s, name, kind, False)  # raises NameTakenError, naming the latest
                        raise NameTakenError(
                            f"artifact {name!r} already exists; choose another name"
                        ) from None
                    except BaseException:
                        s.rollback()
                        if built is not None:
                            self.store.unplace(built, name, version)
                        raise
                    out = self.to_json(s, art)
                    built = None  # placed and committed: no longer ours to clean up
                    break
        finally:
            if built is not None:
                self.store.abandon(built)
        get_host().pm.hook.artifact_recorded(artifact=out, operation=operation)
        return out

    def _orphans(self, session: Session, shas: Iterable[str]) -> list[str]:
        shas = set(shas)
        if not shas:
            return []
        used = set(
            session.exec(
                select(ArtifactFile.sha256)
                .join(Artifact)
                .where(col(ArtifactFile.sha256).in_(shas), Artifact.storage == "store")
            ).all()
        )
        return sorted(shas - used)

    # --- import --------------------------------------------------------------------------

    def _read(self, path: Path, kind: str) -> tuple[Any, Any]:
        path = Path(path).expanduser()
        if not path.exists():
            raise InvalidInputError(f"{path}: no such file or directory")
        if not path.is_dir():
            what = "a Hugging Face model folder" if kind == "base" else "a PEFT adapter folder"
            raise InvalidInputError(f"{path}: not a directory; pass {what}")
        readers = [r for _, r, _ in get_registry("reader").items() if r.kind == kind]
        for reader in readers:
            if reader.can_read(path):
                return reader, reader.read(path)
        if len(readers) == 1:  # let the only reader explain what is missing
            return readers[0], readers[0].read(path)
        names = ", ".join(r.name for r in readers) or "none (all reader plugins are disabled)"
        raise InvalidInputError(f"{path}: no {kind} reader understands this folder; readers: {names}")

    def _stage(self, reader: Any, path: Path) -> Path:
        """The reader's canonical files for ``path``, in a fresh staging folder."""
        staged = self.store.staging()
        try:
            reader.canonical_files(path, staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged

    def add_base(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        copy: bool = False,
        tags: Sequence[str] = (),
        new_version: bool = False,
    ) -> dict[str, Any]:
        path = Path(path).expanduser().absolute()  # linked files are recorded relative to it
        name = check_name(name or path.resolve().name)
        with self.session() as s:  # fail on a taken name before hashing gigabytes
            self.next_version(s, name, "base", new_version)
        reader, m = self._read(path, "base")
        assert isinstance(m, ModelManifest)
        meta = {
            "format": m.format,
            "architecture": m.architecture,
            "model_type": m.model_type,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size,
            "num_layers": m.num_layers,
            "vocab_size": m.vocab_size,
            "dtype": m.dtype,
            "num_parameters": m.num_parameters,
            "tie_word_embeddings": m.tie_word_embeddings,
            "num_tensors": len(m.tensors),
            "source": str(path.resolve()),
        }
        common = dict(
            name=name, kind="base", new_version=new_version, manifest=m.to_dict(), meta=meta, tags=tags
        )
        if copy:
            return self.record(staged=self._stage(reader, path), **common)
        return self.record(linked=path, linked_files=list_files(path), **common)

    def add_adapter(
        self,
        path: str | Path,
        *,
        base: str | None,
        name: str | None = None,
        tags: Sequence[str] = (),
        new_version: bool = False,
        trained_on: str | None = None,
        trained_on_params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Register a PEFT adapter on ``base``; ``trained_on`` names the quantizer of a QLoRA base
        (``nf4``) so merges go into the weights the adapter actually saw."""
        path = Path(path).expanduser().resolve()
        name = check_name(name or path.name)
        if trained_on_params and not trained_on:
            raise InvalidInputError("--trained-on-param needs --trained-on METHOD")
        trained = None
        if trained_on:
            from adaptr.services.quantize import quant_step

            step = quant_step(trained_on, trained_on_params or {})[0]
            trained = {"method": trained_on, "params": step.params}
        if not base:
            raise InvalidInputError(
                "--base is required: name the catalog base model this adapter was trained on"
            )
        with self.session() as s:
            self.next_version(s, name, "adapter", new_version)
            base_art = self.resolve(s, base)
            if base_art.kind != "base":
                raise InvalidInputError(
                    f"{base!r} is not a base model (it is a {base_art.kind!r}); pass a base to --base"
                )
        from adaptr.compat import check_adapter_fits

        reader, m = self._read(path, "adapter")
        assert isinstance(m, AdapterManifest)
        base_m = ModelManifest.from_dict(base_art.manifest)
        flags = list(m.flags) + check_adapter_fits(m, base_m, _ref(base_art))
        ranks = sorted({mod.r for mod in m.modules.values()})
        meta = {
            "format": m.format,
            "r": m.r,
            "ranks": ranks,
            "lora_alpha": m.lora_alpha,
            "use_rslora": m.use_rslora,
            "use_dora": m.use_dora,
            "lora_bias": m.lora_bias,
            "fan_in_fan_out": m.fan_in_fan_out,
            "target_modules": m.target_modules,
            "rank_pattern": m.rank_pattern,
            "alpha_pattern": m.alpha_pattern,
            "modules_to_save": m.modules_to_save,
            "init_lora_weights": m.init_lora_weights,
            "num_modules": len(m.modules),
            "trainable_parameters": m.trainable_parameters,
            "trainable_share": m.trainable_parameters / max(1, base_m.num_parameters),
            "scaling": {k: v.scaling for k, v in m.modules.items()},
            "source": str(path.resolve()),
        }
        if trained:
            meta["trained_on"] = trained
        staged = self._stage(reader, path)
        plugin = get_registry("reader").plugin_of(reader.name)
        parent = Parent(
            base_art, "finetune", {"reader": reader.name}, plugin, get_host().plugin_version(plugin)
        )
        return self.record(
            name=name,
            kind="adapter",
            new_version=new_version,
            staged=staged,
            manifest=m.to_dict(),
            meta=meta,
            parents=[parent],
            base_id=base_art.id,
            rank=m.r if len(ranks) <= 1 else max(ranks),
            flags=flags,
            tags=tags,
        )

    # --- verify and remove ---------------------------------------------------------------

    def verify(self, ref: str | None = None) -> list[dict[str, Any]]:
        """Re-hash every file and report drift from what the catalog recorded."""
        with self.session() as s:
            arts = (
                self._versions(s, ref)
                if ref
                else list(s.exec(select(Artifact).order_by(Artifact.name, Artifact.version)))
            )
            rows = {
                a.id: s.exec(select(ArtifactFile).where(ArtifactFile.artifact_id == a.id)).all() for a in arts
            }
        total = sum(f.size for fs in rows.values() for f in fs)
        reports = []
        with self.progress.task("verifying", total) as advance:
            for a in arts:
                problems = []
                for f in sorted(rows[a.id], key=lambda f: f.relpath):
                    p = Path(a.path) / f.relpath
                    if not p.is_file():
                        problems.append({"path": f.relpath, "problem": "missing"})
                        continue
                    actual = sha256_file(p, progress=advance)
                    if actual != f.sha256:
                        problems.append(
                            {"path": f.relpath, "problem": "modified", "expected": f.sha256, "actual": actual}
                        )
                reports.append(
                    {"ref": _ref(a), "ok": not problems, "problems": problems, "files": len(rows[a.id])}
                )
        return reports

    def descendants(self, ref: str) -> list[str]:
        with self.session() as s:
            ids = {a.id for a in self._versions(s, ref)}
            edges = self._walk(s, ids, up=False)
            kids = {e.child_id for e in edges} - ids
            return sorted(_ref(s.get(Artifact, i)) for i in kids)

    def rm(self, ref: str, *, force: bool = False) -> list[str]:
        """Remove ``NAME`` (all versions) or ``NAME@N``; with ``force`` also everything derived."""
        with self.session() as s:
            targets = {a.id for a in self._versions(s, ref)}
            kids = {e.child_id for e in self._walk(s, targets, up=False)} - targets
            if kids and not force:
                names = ", ".join(sorted(_ref(s.get(Artifact, i)) for i in kids))
                raise HasDescendantsError(
                    f"{ref} has derived artifacts ({names}); remove those first or pass --force to remove "
                    "the whole subtree"
                )
            ids = targets | kids
            arts = [s.get(Artifact, i) for i in ids]
            files = s.exec(select(ArtifactFile).where(col(ArtifactFile.artifact_id).in_(ids))).all()
            stored_shas = {f.sha256 for f in files if s.get(Artifact, f.artifact_id).storage == "store"}
            for model in (Tag, ArtifactFile):
                for row in s.exec(select(model).where(col(model.artifact_id).in_(ids))):
                    s.delete(row)
            for e in s.exec(
                select(LineageEdge).where(
                    col(LineageEdge.parent_id).in_(ids) | col(LineageEdge.child_id).in_(ids)
                )
            ):
                s.delete(e)
            s.flush()
            for a in sorted(arts, key=lambda a: -a.id):  # children first: base_id references
                s.delete(a)
                s.flush()
            s.commit()
            orphans = self._orphans(s, stored_shas)
            removed = []
            for a in arts:
                if a.storage == "store":
                    self.store.discard(a.name, a.version, [])
                removed.append(_ref(a))
            for sha in orphans:
                self.store.object_path(sha).unlink(missing_ok=True)
        return sorted(removed)

    def gc(self, *, dry_run: bool = False) -> dict[str, Any]:
        """Remove what no catalog row owns: staging folders of dead processes, unregistered
        artifact folders and unreferenced objects. Never touches linked (user-owned) files, nor
        live work of other processes: an artifact folder is judged holding its name's lock (a
        registration holds it from placing the folder until its row is committed), and an
        object that a folder still links (a build in progress) stays."""
        from collections import Counter

        from adaptr.store import tree_size

        removed: dict[str, list[str]] = {"staging": [], "artifacts": [], "objects": []}
        freed = 0
        doomed: Counter[int] = Counter()  # dry run: object links the listed folders hold

        def drop(folder: Path) -> None:
            if dry_run:
                doomed.update(f.stat().st_ino for f in folder.rglob("*") if f.is_file())
            else:
                shutil.rmtree(folder, ignore_errors=True)

        with self.session() as s:
            for p in self.store.leftovers():
                removed["staging"].append(p.name)
                freed += tree_size(p)
                if p.is_dir():
                    drop(p)
                elif not dry_run:
                    p.unlink(missing_ok=True)
            if self.store.artifacts.is_dir():
                for name_dir in sorted(self.store.artifacts.iterdir()):
                    if not name_dir.is_dir():
                        continue
                    with self.store.lock(name_dir.name):
                        stored = {
                            str(v)
                            for v in s.exec(
                                select(Artifact.version).where(
                                    Artifact.name == name_dir.name, Artifact.storage == "store"
                                )
                            )
                        }
                        for vdir in sorted(name_dir.iterdir()):
                            if vdir.name not in stored:
                                removed["artifacts"].append(f"{name_dir.name}@{vdir.name}")
                                freed += tree_size(vdir)
                                drop(vdir)
                        if not dry_run and not any(name_dir.iterdir()):
                            name_dir.rmdir()
            used = set(
                s.exec(select(ArtifactFile.sha256).join(Artifact).where(Artifact.storage == "store")).all()
            )
            if self.store.objects.is_dir():
                for obj in sorted(self.store.objects.glob("*/*")):
                    st = obj.stat()
                    if obj.name not in used and st.st_nlink - doomed[st.st_ino] <= 1:
                        removed["objects"].append(obj.name)
                        freed += st.st_size
                        if not dry_run:
                            obj.unlink(missing_ok=True)
        return {"removed": removed, "freed_bytes": freed, "dry_run": dry_run}

    def count(self) -> int:
        with self.session() as s:
            return s.exec(select(func.count()).select_from(Artifact)).one()


def _utc(t: datetime) -> datetime:
    """SQLite drops the zone of stored times; they are UTC, so say so on every backend alike."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _ref(a: Artifact) -> str:
    return f"{a.name}@{a.version}"


# A registration retries on a unique-constraint race with another host only with new_version.
_RECORD_ATTEMPTS = 20


def _is_name_version_conflict(e: IntegrityError) -> bool:
    """The (name, version) unique constraint, as PostgreSQL (by name) or SQLite (by columns) says it."""
    text = str(e.orig)
    return "uq_artifact_name_version" in text or "artifact.name, artifact.version" in text


def _total_size(folder: Path | None, files: list[Path] | None) -> int | None:
    if folder is None:
        return None
    try:
        return sum(p.stat().st_size for p in (files if files is not None else list_files(folder)))
    except OSError as e:
        raise OperationError(f"cannot read {folder}: {e}") from e


__all__ = ["AdaptrError", "Catalog", "FileEntry", "Parent"]
