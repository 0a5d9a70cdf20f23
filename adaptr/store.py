"""Content-addressed artifact store.

Files adaptr writes or copies live once under ``store/objects/<sha[:2]>/<sha>``; each
artifact version gets a real folder (``store/artifacts/<name>/<version>``) whose files
are hard links to those objects, so transformers and PEFT load it directly and equal
files are shared between artifacts. Producers write into a staging folder; ``commit``
moves the files into place (fsync + rename) before the caller records the catalog row.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from adaptr.errors import OperationError
from adaptr.io.files import fsync_dir, sha256_file


@dataclass(frozen=True)
class FileEntry:
    relpath: str
    size: int
    sha256: str


def content_hash(files: Iterable[FileEntry]) -> str:
    """sha256 over sorted ``relpath\\0sha256\\n`` lines: equal contents give equal hashes."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relpath):
        h.update(f"{f.relpath}\0{f.sha256}\n".encode())
    return h.hexdigest()


def list_files(folder: Path) -> list[Path]:
    """Regular files of an artifact folder, skipping hidden entries (.git, .cache)."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return [p for p in out if p.is_file()]


def hash_folder(
    folder: Path, progress: Callable[[int], None] | None = None, files: list[Path] | None = None
) -> list[FileEntry]:
    paths = files if files is not None else list_files(folder)
    return [
        FileEntry(p.relative_to(folder).as_posix(), p.stat().st_size, sha256_file(p, progress=progress))
        for p in paths
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.artifacts = root / "artifacts"
        self.tmp = root / "tmp"

    def staging(self) -> Path:
        """A fresh folder to write an artifact's files into before ``commit``."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        path = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}"  # the pid lets gc tell live work from leftovers
        path.mkdir()
        return path

    def artifact_dir(self, name: str, version: int) -> Path:
        return self.artifacts / name / str(version)

    def object_path(self, sha: str) -> Path:
        return self.objects / sha[:2] / sha

    def commit(
        self,
        staged: Path,
        name: str,
        version: int,
        progress: Callable[[int], None] | None = None,
        known_hashes: dict[str, str] | None = None,
    ) -> tuple[Path, list[FileEntry]]:
        """Hash staged files into objects and materialise the artifact folder; return both.

        ``known_hashes`` (relpath -> sha256) spares re-reading files whose writer hashed them.
        """
        final = self.artifact_dir(name, version)
        if final.exists():  # left by a crash before its catalog row was committed
            shutil.rmtree(final)
        building = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}.dir"
        entries: list[FileEntry] = []
        created: list[Path] = []  # objects this commit added, removed again if it does not finish
        placed = False
        try:
            for src in list_files(staged):
                rel = src.relative_to(staged).as_posix()
                known = (known_hashes or {}).get(rel)
                if known is None:
                    _fsync_file(src)
                sha = known or sha256_file(src, progress=progress)
                obj = self.object_path(sha)
                if not obj.exists():
                    obj.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, obj)
                    created.append(obj)
                    fsync_dir(obj.parent)
                dest = building / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(obj, dest)
                entries.append(FileEntry(rel, obj.stat().st_size, sha))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(building, final)
            placed = True
            fsync_dir(final.parent)
        except BaseException as e:  # Ctrl-C included: leave no partial folder or orphan object behind
            shutil.rmtree(building, ignore_errors=True)
            if placed:
                shutil.rmtree(final, ignore_errors=True)
            with contextlib.suppress(OSError):
                final.parent.rmdir()  # only when empty: other versions stay
            for obj in created:
                obj.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise OperationError(f"could not write artifact files into {self.root}: {e}") from e
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return final, entries

    def leftovers(self) -> list[Path]:
        """Staging folders of processes that no longer run (killed merges, crashes)."""
        if not self.tmp.is_dir():
            return []
        out = []
        for p in sorted(self.tmp.iterdir()):
            pid = p.name.split("-", 1)[0]
            if not pid.isdigit() or not _alive(int(pid)):
                out.append(p)
        return out

    def discard(self, name: str, version: int, orphaned: Iterable[str]) -> None:
        """Remove an artifact folder and the objects no other artifact references."""
        shutil.rmtree(self.artifact_dir(name, version), ignore_errors=True)
        for sha in orphaned:
            try:
                self.object_path(sha).unlink()
            except FileNotFoundError:
                pass
        parent = self.artifacts / name
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
